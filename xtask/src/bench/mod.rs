//! `cargo xtask bench ...`: the benchmarks. `sync` (weir's control plane at scale),
//! `compare` (weir against the programs it replaces, on one topology), `datapath` and
//! `policy` (the data path's cost), `api` (weir against the real kube-proxy, through one
//! API server), `dir` (weir fed one manifest file), `check` (the regression gate against
//! docs/bench/baseline.json), `plot` (the README's figures); `rig` is the topology they
//! share and `report` the rows and tables `compare`, `check` and `plot` read.

pub mod api;
pub mod check;
pub mod compare;
pub mod datapath;
pub mod dirsource;
pub mod plot;
pub mod policy;
pub mod report;
pub mod rig;
pub mod sync;

//! The nftables backend: one table `weir` per family; every service, endpoint and
//! NodePort is an element of shared named maps and sets.

pub mod fake;
pub mod kernel;
pub mod plan;
pub mod render;
pub mod table;
pub mod tracer;

pub use plan::{Op, Plan};
pub use table::{DumpedTable, Family, Table};

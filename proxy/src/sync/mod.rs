//! The sync runner: records source updates in change trackers and runs one rate-limited
//! sync at a time (compute -> render -> plan -> apply).

pub mod effects;
pub mod policy;
pub mod runner;
pub mod schedule;
pub mod tally;

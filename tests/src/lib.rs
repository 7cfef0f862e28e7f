//! weir e2e harness

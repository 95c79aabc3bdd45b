//! Jacobi workload (being written).

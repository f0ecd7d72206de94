//! The host resource governor: loads the kernel programs, samples per-VM
//! telemetry, and serves status.

//! Shared fixtures for the integration tests: unique names, and guards that
//! remove cgroups, namespaces, links and pins when a test ends or fails.

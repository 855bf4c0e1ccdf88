//! Manifest checks (work in progress).

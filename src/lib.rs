//! token-ratelimit core

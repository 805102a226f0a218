//! Access: who is calling (bearer-token authentication) and what they may
//! do (the policy holder, which asks the Cedar policy set in force).

pub mod auth;
pub mod policy;

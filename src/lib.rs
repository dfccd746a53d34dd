//! yametee-deploy: brings the yametee hosts from an inventory file to running, firewalled,
//! verified state over SSH.

pub mod inventory;
pub mod lab;
pub mod render;
pub mod secrets;

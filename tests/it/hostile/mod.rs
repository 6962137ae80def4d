//! Attacks and careless integrations, played against the real parts (issue 12): values the
//! merchant's application may legally write, oversized and forged input from WeChat's side,
//! slow and abusive clients on the listeners, secrets in error paths, and metrics that must be
//! there before anything happens. Each test fails on the code before its fix.

mod listeners;
mod logs;
mod metrics;
mod rows;
mod secrets;
mod tasks;
mod texts;
mod wechat;

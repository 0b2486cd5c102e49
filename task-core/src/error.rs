//! The error a task gets when the engine, not the worker, decides its fate.

use std::any::Any;
use std::fmt;

/// Why a task finished without its worker reporting on its own.
///
/// A task's error type `E` must implement `From<TaskError>` so that the engine can report a worker
/// panic or a cancellation through the same `E` the worker uses for its own errors.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskError {
    /// The worker panicked; the payload is the panic message (or a placeholder if it was not text).
    Panicked(String),
    /// The task was still queued when its pool shut down, so its worker never ran.
    Cancelled,
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Panicked(msg) => write!(f, "worker panicked: {msg}"),
            TaskError::Cancelled => f.write_str("task cancelled before its worker ran"),
        }
    }
}

impl std::error::Error for TaskError {}

/// Turns a panic payload into its message.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_sentence_case() {
        assert_eq!(
            TaskError::Panicked("boom".into()).to_string(),
            "worker panicked: boom"
        );
        assert_eq!(
            TaskError::Cancelled.to_string(),
            "task cancelled before its worker ran"
        );
    }

    #[test]
    fn panic_message_from_payloads() {
        let p: Box<dyn Any + Send> = Box::new("static");
        assert_eq!(panic_message(&*p), "static");
        let p: Box<dyn Any + Send> = Box::new(String::from("owned"));
        assert_eq!(panic_message(&*p), "owned");
        let p: Box<dyn Any + Send> = Box::new(42u32);
        assert_eq!(panic_message(&*p), "non-string panic payload");
    }
}

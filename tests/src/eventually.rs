//! Waiting for a condition in an integration test: one helper for all.
//!
//! [`eventually`] polls `check` every [`POLL`] until it holds (a `bool`) or
//! yields a value (`Some`), and panics naming `what` once `limit` has passed.
//! It waits for a positive signal; it is never a way to wait for "nothing
//! happened" (for that, wait for something that must come after).

use std::time::Duration;

use tokio::time::Instant;

/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(50);

/// What a check may answer: `true`/`Some(v)` when the wait is over.
pub trait Ready {
    type Output;
    fn ready(self) -> Option<Self::Output>;
}

impl Ready for bool {
    type Output = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Ready for Option<T> {
    type Output = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Polls `check` until it is ready; panics with `what` after `limit`.
pub async fn eventually<R: Ready>(
    what: &str,
    limit: Duration,
    check: impl AsyncFnMut() -> R,
) -> R::Output {
    eventually_or(what, limit, String::new, check).await
}

/// [`eventually`], adding `context()` (e.g. what was received so far) to the
/// panic message.
pub async fn eventually_or<R: Ready>(
    what: &str,
    limit: Duration,
    context: impl FnOnce() -> String,
    mut check: impl AsyncFnMut() -> R,
) -> R::Output {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await.ready() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}{}", context());
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_ready() {
        let mut polls = 0;
        let v = eventually("the third poll", Duration::from_secs(5), async || {
            polls += 1;
            (polls == 3).then_some(polls)
        })
        .await;
        assert_eq!(v, 3);
        eventually("a bool", Duration::from_secs(5), async || true).await;
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after 200ms waiting for the impossible; context")]
    async fn panics_with_the_description_after_the_limit() {
        eventually_or(
            "the impossible",
            Duration::from_millis(200),
            || "; context".to_owned(),
            async || false,
        )
        .await;
    }
}

//! Which API's conventions a route follows: its error shape, its headers.
//! Decided once per request from the route's `Surface`
//! (`crate::pipeline`), or from the path where no route matched.

/// OpenAI's conventions or Anthropic's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiStyle {
    OpenAi,
    Anthropic,
}

impl ApiStyle {
    /// Anthropic's routes are `/v1/messages*`; every other path answers in
    /// OpenAI's shape. Only for answers given before a route is known (the
    /// edge middleware, the fallbacks).
    pub fn for_path(path: &str) -> Self {
        if path.starts_with("/v1/messages") {
            ApiStyle::Anthropic
        } else {
            ApiStyle::OpenAi
        }
    }
}

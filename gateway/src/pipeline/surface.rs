//! The API a request came in on, decided once from its route: its error
//! style, event format, span operation, validation table, and the upstream
//! path on each deployment.

use tollgate_schemas::events::ApiFormat;

use crate::config::ProviderKind;
use crate::error::ApiStyle;
use crate::routing::Deployment;
use crate::validate;

/// The API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Chat,
    Completions,
    Embeddings,
    Messages,
    Responses,
}

impl Surface {
    pub fn style(self) -> ApiStyle {
        match self {
            Surface::Messages => ApiStyle::Anthropic,
            _ => ApiStyle::OpenAi,
        }
    }

    pub fn api(self) -> ApiFormat {
        match self {
            Surface::Chat => ApiFormat::OpenaiChat,
            Surface::Completions => ApiFormat::OpenaiCompletions,
            Surface::Embeddings => ApiFormat::OpenaiEmbeddings,
            Surface::Messages => ApiFormat::AnthropicMessages,
            Surface::Responses => ApiFormat::OpenaiResponses,
        }
    }

    /// The GenAI semantic conventions' `gen_ai.operation.name`.
    pub fn operation(self) -> &'static str {
        match self {
            Surface::Chat | Surface::Messages | Surface::Responses => "chat",
            Surface::Completions => "text_completion",
            Surface::Embeddings => "embeddings",
        }
    }

    pub fn route(self) -> &'static str {
        match self {
            Surface::Chat => "/v1/chat/completions",
            Surface::Completions => "/v1/completions",
            Surface::Embeddings => "/v1/embeddings",
            Surface::Messages => "/v1/messages",
            Surface::Responses => "/v1/responses",
        }
    }

    /// The table its body is checked against ([`crate::validate`]).
    pub fn validated_as(self) -> validate::Api {
        match self {
            Surface::Chat => validate::Api::Chat,
            Surface::Completions => validate::Api::Completions,
            Surface::Embeddings => validate::Api::Embeddings,
            Surface::Messages => validate::Api::Messages,
            Surface::Responses => validate::Api::Responses,
        }
    }

    /// The client's format, as the provider kind that speaks it natively.
    pub(super) fn native(self) -> ProviderKind {
        match self {
            Surface::Messages => ProviderKind::Anthropic,
            _ => ProviderKind::Openai,
        }
    }

    /// The upstream path on deployment `d`.
    pub(super) fn upstream_path(self, d: &Deployment) -> &'static str {
        match (d.provider, self) {
            (ProviderKind::Openai, Surface::Responses) if d.responses_api => "/responses",
            (ProviderKind::Openai, Surface::Responses) => "/chat/completions",
            (ProviderKind::Anthropic, _) => "/v1/messages",
            (ProviderKind::Openai, Surface::Chat | Surface::Messages) => "/chat/completions",
            (ProviderKind::Openai, Surface::Completions) => "/completions",
            (ProviderKind::Openai, Surface::Embeddings) => "/embeddings",
        }
    }
}

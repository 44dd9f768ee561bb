//! Request bodies, deserialized straight into the counts the mock needs:
//! message texts are never collected, only their words counted while parsing.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::wire::count_words;

/// `POST /v1/chat/completions`.
#[derive(Deserialize)]
pub(super) struct ChatRequest<'a> {
    #[serde(borrow)]
    pub model: Cow<'a, str>,
    pub messages: Messages,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
}

/// `stream_options` of the OpenAI routes.
#[derive(Deserialize)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Deserialize)]
pub(super) struct CompletionRequest<'a> {
    #[serde(borrow)]
    pub model: Cow<'a, str>,
    #[serde(default)]
    pub prompt: Prompt,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
}

/// `POST /v1/messages` and `POST /v1/messages/count_tokens`.
#[derive(Deserialize)]
pub(super) struct MessagesRequest<'a> {
    #[serde(borrow)]
    pub model: Cow<'a, str>,
    pub messages: Messages,
    #[serde(default)]
    pub system: Option<Words>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub stream: Option<bool>,
}

/// `POST /v1/embeddings`.
#[derive(Deserialize)]
pub(super) struct EmbeddingsRequest<'a> {
    #[serde(borrow)]
    pub model: Cow<'a, str>,
    pub input: EmbeddingInputs,
    #[serde(default)]
    pub dimensions: Option<u64>,
    #[serde(default, borrow)]
    pub encoding_format: Option<Cow<'a, str>>,
}

/// `POST /mock/fail-next`.
#[derive(Deserialize)]
pub(super) struct FailNext {
    #[serde(default = "one")]
    pub count: u64,
    #[serde(default = "service_unavailable")]
    pub status: u16,
}

fn one() -> u64 {
    1
}

fn service_unavailable() -> u16 {
    503
}

/// Words of all text in a content value: a string, or (recursively) the
/// `text` and `content` members of blocks/parts. Other members (images,
/// tool inputs, ids) count nothing.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Words(pub u64);

impl<'de> Deserialize<'de> for Words {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WordsVisitor)
    }
}

struct WordsVisitor;

impl<'de> Visitor<'de> for WordsVisitor {
    type Value = Words;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("message content")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Words, E> {
        Ok(Words(count_words(s)))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Words, E> {
        Ok(Words(0))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Words, E> {
        Ok(Words(0))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Words, E> {
        Ok(Words(0))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Words, E> {
        Ok(Words(0))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Words, E> {
        Ok(Words(0))
    }

    fn visit_none<E: de::Error>(self) -> Result<Words, E> {
        Ok(Words(0))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Words, D::Error> {
        Words::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Words, A::Error> {
        let mut n = 0;
        while let Some(Words(w)) = seq.next_element()? {
            n += w;
        }
        Ok(Words(n))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Words, A::Error> {
        let mut n = 0;
        while let Some(key) = map.next_key::<TextKey>()? {
            match key {
                TextKey::Text => n += map.next_value::<Words>()?.0,
                TextKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Words(n))
    }
}

/// A map key: `text` / `content` (counted) or anything else (skipped).
enum TextKey {
    Text,
    Other,
}

impl<'de> Deserialize<'de> for TextKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TextKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TextKey, E> {
                Ok(match s {
                    "text" | "content" => TextKey::Text,
                    _ => TextKey::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// The `messages` array: how many messages, and the words of their content.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Messages {
    pub count: u64,
    pub words: u64,
}

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages, A::Error> {
                let mut m = Messages::default();
                while let Some(Words(w)) = seq.next_element()? {
                    m.count += 1;
                    m.words += w;
                }
                Ok(m)
            }
        }
        d.deserialize_seq(V)
    }
}

/// The legacy `prompt`: a string, an array of strings, an array of tokens or
/// an array of token arrays. Counts words of strings plus one per token.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Prompt(pub u64);

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Prompt;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a prompt: string, array of strings or token arrays")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Prompt, E> {
                Ok(Prompt(count_words(s)))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Prompt, E> {
                Ok(Prompt(1))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Prompt, E> {
                Ok(Prompt(1))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Prompt, E> {
                Ok(Prompt(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
                let mut n = 0;
                while let Some(Prompt(p)) = seq.next_element()? {
                    n += p;
                }
                Ok(Prompt(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// One embedding input: a seed for its deterministic vector and its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct EmbeddingInput {
    pub seed: u64,
    pub tokens: u64,
}

/// The embeddings `input`: a string, an array of strings, an array of tokens
/// (one input) or an array of token arrays. Never empty.
#[derive(Debug)]
pub(super) struct EmbeddingInputs(pub Vec<EmbeddingInput>);

enum InputElem {
    Text(EmbeddingInput),
    Token(u64),
    Tokens(EmbeddingInput),
}

impl<'de> Deserialize<'de> for InputElem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = InputElem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a token or an array of tokens")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<InputElem, E> {
                Ok(InputElem::Text(text_input(s)))
            }
            fn visit_u64<E: de::Error>(self, t: u64) -> Result<InputElem, E> {
                Ok(InputElem::Token(t))
            }
            fn visit_i64<E: de::Error>(self, t: i64) -> Result<InputElem, E> {
                u64::try_from(t)
                    .map(InputElem::Token)
                    .map_err(|_| E::custom("tokens must be non-negative integers"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<InputElem, A::Error> {
                let mut hash = Fnv::new();
                let mut tokens = 0;
                while let Some(t) = seq.next_element::<u64>()? {
                    hash.write(&t.to_le_bytes());
                    tokens += 1;
                }
                Ok(InputElem::Tokens(EmbeddingInput {
                    seed: hash.0,
                    tokens,
                }))
            }
        }
        d.deserialize_any(V)
    }
}

fn text_input(s: &str) -> EmbeddingInput {
    let mut hash = Fnv::new();
    hash.write(s.as_bytes());
    EmbeddingInput {
        seed: hash.0,
        tokens: count_words(s),
    }
}

impl<'de> Deserialize<'de> for EmbeddingInputs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = EmbeddingInputs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a non-empty array of strings or token arrays")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<EmbeddingInputs, E> {
                Ok(EmbeddingInputs(vec![text_input(s)]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EmbeddingInputs, A::Error> {
                let mut inputs = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(4096));
                let mut single = Fnv::new();
                let mut single_tokens = 0u64;
                while let Some(elem) = seq.next_element::<InputElem>()? {
                    match elem {
                        InputElem::Text(i) | InputElem::Tokens(i) => {
                            if single_tokens > 0 {
                                return Err(de::Error::custom(MIXED));
                            }
                            inputs.push(i);
                        }
                        InputElem::Token(t) => {
                            if !inputs.is_empty() {
                                return Err(de::Error::custom(MIXED));
                            }
                            single.write(&t.to_le_bytes());
                            single_tokens += 1;
                        }
                    }
                }
                if single_tokens > 0 {
                    inputs.push(EmbeddingInput {
                        seed: single.0,
                        tokens: single_tokens,
                    });
                }
                if inputs.is_empty() {
                    return Err(de::Error::custom("'input' must not be empty"));
                }
                Ok(EmbeddingInputs(inputs))
            }
        }
        d.deserialize_any(V)
    }
}

const MIXED: &str = "'input' mixes tokens with strings or token arrays";

/// 64-bit FNV-1a.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_words_in_every_content_shape() {
        let body = br#"{"model":"m","messages":[
            {"role":"system","content":"be  brief"},
            {"role":"user","content":[{"type":"text","text":"one two three"},{"type":"image_url","image_url":{"url":"x y z"}}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"a","function":{"arguments":"{\"text\":\"no no\"}"}}]},
            {"role":"tool","tool_call_id":"a","content":"four"}
        ]}"#;
        let r: ChatRequest<'_> = serde_json::from_slice(body).unwrap();
        assert_eq!(r.messages.count, 4);
        assert_eq!(r.messages.words, 6);
    }

    #[test]
    fn anthropic_system_blocks_and_tool_results() {
        let body = br#"{"model":"m","system":[{"type":"text","text":"sys one"}],"messages":[
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"a b c"}]}]},
            {"role":"assistant","content":[{"type":"tool_use","id":"t","name":"n","input":{"text":"ignored words"}}]}
        ]}"#;
        let r: MessagesRequest<'_> = serde_json::from_slice(body).unwrap();
        assert_eq!(r.system.map(|w| w.0), Some(2));
        assert_eq!(r.messages.count, 2);
        assert_eq!(r.messages.words, 3);
    }

    #[test]
    fn prompt_and_embedding_inputs() {
        let p: Prompt = serde_json::from_str(r#"["a b", [1, 2, 3], "c"]"#).unwrap();
        assert_eq!(p.0, 6);
        let e: EmbeddingInputs = serde_json::from_str("[1, 2, 3]").unwrap();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].tokens, 3);
        let e: EmbeddingInputs = serde_json::from_str(r#"["a b", "c"]"#).unwrap();
        assert_eq!(e.0.len(), 2);
        assert!(serde_json::from_str::<EmbeddingInputs>("[]").is_err());
        assert!(serde_json::from_str::<EmbeddingInputs>(r#"[1, "a"]"#).is_err());
    }
}

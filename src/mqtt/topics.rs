//! Every MQTT topic attrd uses is built here and nowhere else, so the topic tree in `docs/mqtt.md` has exactly one
//! implementation.
//!
//! Values that become topic segments (node, SKU, model name, command kind) are validated, never rewritten: a SKU
//! that cannot be a topic segment is an error the pipeline reports, not a silently different topic.

use std::fmt;

/// Longest SKU accepted as a topic segment, in bytes.
pub const MAX_SKU_LEN: usize = 128;
/// Longest node, prefix segment, model name or command kind, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// The topic level under the prefix where models are announced and shipped to the whole fleet.
const MODELS_LEVEL: &str = "models";

/// Why a value cannot be used in a topic, or a received topic is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The value is empty.
    #[error("{what} must not be empty")]
    Empty {
        /// Which value (`"SKU"`, `"node"`, …).
        what: &'static str,
    },
    /// The value is longer than allowed.
    #[error("{what} is {len} bytes long, more than the {max} allowed in a topic")]
    TooLong {
        /// Which value.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value contains a character that would change the topic's meaning.
    #[error("{what} {value:?} contains {ch:?}, which is not allowed in an MQTT topic segment")]
    Forbidden {
        /// Which value.
        what: &'static str,
        /// The value, truncated to 80 characters.
        value: String,
        /// The offending character.
        ch: char,
    },
    /// The value starts with `$`, which brokers reserve for their own topics.
    #[error("{what} {value:?} must not start with '$'")]
    Reserved {
        /// Which value.
        what: &'static str,
        /// The value, truncated to 80 characters.
        value: String,
    },
    /// The node is named like a fleet-wide topic level of the prefix (`models`), so its own topics would fall
    /// under that level's subscriptions.
    #[error("node {value:?} is taken by the fleet's <prefix>/{value}/… topics; choose another node name")]
    ReservedNode {
        /// The node name.
        value: String,
    },
    /// A received topic is not `<prefix>/<node>/cmd/<kind>` (or its response topic).
    #[error("{topic:?} is not a command topic of this node (expected {expected}/<kind>)")]
    NotACommand {
        /// The received topic, truncated to 200 characters.
        topic: String,
        /// The expected command topic prefix.
        expected: String,
    },
}

/// The validated kind of a command: the segment after `cmd/` (ASCII letters, digits, `_`, `-`, `.`). Which kinds
/// exist is decided by whoever consumes [`super::IncomingCommand`]s.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct CommandKind(String);

impl CommandKind {
    /// Validates a command kind.
    pub fn new(kind: &str) -> Result<Self, TopicError> {
        check_len("command kind", kind, MAX_NAME_LEN)?;
        if let Some(ch) = kind.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
            return Err(TopicError::Forbidden { what: "command kind", value: truncate(kind, 80), ch });
        }
        Ok(Self(kind.to_owned()))
    }

    /// The kind as written in the topic.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a topic under [`Topics::cmd_filter`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandTopic {
    /// `<prefix>/<node>/cmd/<kind>`: a command to execute.
    Command(CommandKind),
    /// `<prefix>/<node>/cmd/<kind>/response`: a reply (ours, echoed back by the subscription); never executed.
    Response(CommandKind),
}

/// Builds attrd's topics for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
    node: String,
    /// `<prefix>/<node>`.
    base: String,
}

impl Topics {
    /// `prefix` is one or more `/`-separated segments (default `attrd`); `node` is one segment.
    pub fn new(prefix: &str, node: &str) -> Result<Self, TopicError> {
        if prefix.is_empty() {
            return Err(TopicError::Empty { what: "topic prefix" });
        }
        for seg in prefix.split('/') {
            check_segment("topic prefix segment", seg, MAX_NAME_LEN)?;
        }
        check_segment("node", node, MAX_NAME_LEN)?;
        // `<prefix>/models/+` is what nodes subscribe to for model announcements: a node named `models` would hear its
        // own retained status there, as an announcement that never parses, every few seconds.
        if node == MODELS_LEVEL {
            return Err(TopicError::ReservedNode { value: node.to_owned() });
        }
        Ok(Self { prefix: prefix.to_owned(), node: node.to_owned(), base: format!("{prefix}/{node}") })
    }

    /// The topic prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// `<prefix>/<node>/available`: retained `online`, `offline` (last will) or `stopped`.
    pub fn available(&self) -> String {
        format!("{}/available", self.base)
    }

    /// `<prefix>/<node>/status`: retained daemon status.
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    /// `<prefix>/<node>/results/<sku>`: one item's attributes.
    pub fn result(&self, sku: &str) -> Result<String, TopicError> {
        check_sku(sku)?;
        Ok(format!("{}/results/{sku}", self.base))
    }

    /// `<prefix>/<node>/model/state`: retained state of the active model.
    pub fn model_state(&self) -> String {
        format!("{}/model/state", self.base)
    }

    /// `<prefix>/<node>/cmd/#`: the subscription for commands.
    pub fn cmd_filter(&self) -> String {
        format!("{}/cmd/#", self.base)
    }

    /// `<prefix>/<node>/cmd/<kind>`: where a command of this kind is sent.
    pub fn cmd(&self, kind: &CommandKind) -> String {
        format!("{}/cmd/{kind}", self.base)
    }

    /// `<prefix>/<node>/cmd/<kind>/response`: replies to commands of this kind.
    pub fn cmd_response(&self, kind: &CommandKind) -> String {
        format!("{}/cmd/{kind}/response", self.base)
    }

    /// `<prefix>/<node>/errors`: error replies to messages whose topic names no valid command kind.
    pub fn errors(&self) -> String {
        format!("{}/errors", self.base)
    }

    /// `<prefix>/models/<name>`: fleet-wide model announcements.
    pub fn models(&self, name: &str) -> Result<String, TopicError> {
        check_segment("model name", name, MAX_NAME_LEN)?;
        Ok(format!("{}/{MODELS_LEVEL}/{name}", self.prefix))
    }

    /// The subscription for model announcements: `<prefix>/models/<name>`, or `<prefix>/models/+` for every name
    /// when `name` is `None`. Chunks live one level deeper, so neither filter delivers them.
    pub fn models_filter(&self, name: Option<&str>) -> Result<String, TopicError> {
        match name {
            Some(n) => self.models(n),
            None => Ok(format!("{}/{MODELS_LEVEL}/+", self.prefix)),
        }
    }

    /// `<prefix>/models/<name>/chunks/<transfer>/<index>`: one retained chunk of a shipped bundle. `transfer`
    /// names one upload (the first 16 hex digits of the archive's SHA-256), so chunks of different versions never
    /// mix.
    pub fn model_chunk(&self, name: &str, transfer: &str, index: u32) -> Result<String, TopicError> {
        check_segment("model name", name, MAX_NAME_LEN)?;
        check_transfer(transfer)?;
        Ok(format!("{}/{MODELS_LEVEL}/{name}/chunks/{transfer}/{index}", self.prefix))
    }

    /// `<prefix>/models/<name>/chunks/<transfer>/+`: the subscription for one upload's chunks.
    pub fn model_chunks_filter(&self, name: &str, transfer: &str) -> Result<String, TopicError> {
        check_segment("model name", name, MAX_NAME_LEN)?;
        check_transfer(transfer)?;
        Ok(format!("{}/{MODELS_LEVEL}/{name}/chunks/{transfer}/+", self.prefix))
    }

    /// Classifies a topic under `<prefix>/models/`; `None` for anything else (including malformed chunk topics,
    /// which no attrd publishes).
    pub fn parse_model(&self, topic: &str) -> Option<ModelTopic> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?
            .strip_prefix(MODELS_LEVEL)?
            .strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [name] => {
                check_segment("model name", name, MAX_NAME_LEN).ok()?;
                Some(ModelTopic::Announcement { name: (*name).to_owned() })
            }
            [name, "chunks", transfer, index] => {
                check_segment("model name", name, MAX_NAME_LEN).ok()?;
                check_transfer(transfer).ok()?;
                // Only the canonical decimal form, so one chunk has exactly one topic.
                let i: u32 = index.parse().ok()?;
                (i.to_string() == *index).then(|| ModelTopic::Chunk {
                    name: (*name).to_owned(),
                    transfer: (*transfer).to_owned(),
                    index: i,
                })
            }
            _ => None,
        }
    }

    /// Classifies a topic received on [`Topics::cmd_filter`].
    pub fn parse_command(&self, topic: &str) -> Result<CommandTopic, TopicError> {
        let cmd_base = format!("{}/cmd", self.base);
        let not_cmd = || TopicError::NotACommand { topic: truncate(topic, 200), expected: cmd_base.clone() };
        let rest = topic.strip_prefix(cmd_base.as_str()).and_then(|r| r.strip_prefix('/')).ok_or_else(not_cmd)?;
        let mut parts = rest.split('/');
        let kind = parts.next().unwrap_or_default();
        let tail: Vec<&str> = parts.collect();
        match tail.as_slice() {
            [] => Ok(CommandTopic::Command(CommandKind::new(kind)?)),
            ["response"] => Ok(CommandTopic::Response(CommandKind::new(kind)?)),
            _ => Err(not_cmd()),
        }
    }
}

/// What a topic under `<prefix>/models/` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelTopic {
    /// `<prefix>/models/<name>`: the retained announcement of the current bundle of that name.
    Announcement {
        /// The model name.
        name: String,
    },
    /// `<prefix>/models/<name>/chunks/<transfer>/<index>`: one chunk of an upload.
    Chunk {
        /// The model name.
        name: String,
        /// The upload it belongs to.
        transfer: String,
        /// Zero-based chunk index.
        index: u32,
    },
}

/// Length of a transfer id: the first 16 hex digits of the archive's SHA-256.
pub const TRANSFER_ID_LEN: usize = 16;

fn check_transfer(transfer: &str) -> Result<(), TopicError> {
    if transfer.len() != TRANSFER_ID_LEN {
        return Err(TopicError::TooLong { what: "transfer id", len: transfer.len(), max: TRANSFER_ID_LEN });
    }
    if let Some(ch) = transfer.chars().find(|c| !matches!(c, '0'..='9' | 'a'..='f')) {
        return Err(TopicError::Forbidden { what: "transfer id", value: truncate(transfer, 80), ch });
    }
    Ok(())
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

fn check_len(what: &'static str, value: &str, max: usize) -> Result<(), TopicError> {
    if value.is_empty() {
        return Err(TopicError::Empty { what });
    }
    if value.len() > max {
        return Err(TopicError::TooLong { what, len: value.len(), max });
    }
    Ok(())
}

/// Whether `sku` can name a result topic ([`Topics::result`]): every source checks this when a SKU comes in, so a
/// photo whose SKU cannot be published is refused at once rather than processed for nothing.
pub fn check_sku(sku: &str) -> Result<(), TopicError> {
    check_segment("SKU", sku, MAX_SKU_LEN)
}

/// One topic segment: no separators or wildcards, no NUL or other control characters, not broker-reserved.
fn check_segment(what: &'static str, value: &str, max: usize) -> Result<(), TopicError> {
    check_len(what, value, max)?;
    if let Some(ch) = value.chars().find(|c| matches!(c, '/' | '+' | '#') || c.is_control()) {
        return Err(TopicError::Forbidden { what, value: truncate(value, 80), ch });
    }
    if value.starts_with('$') {
        return Err(TopicError::Reserved { what, value: truncate(value, 80) });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Topics {
        Topics::new("attrd", "edge-1").unwrap()
    }

    #[test]
    fn builds_the_documented_tree() {
        let t = t();
        assert_eq!(t.available(), "attrd/edge-1/available");
        assert_eq!(t.status(), "attrd/edge-1/status");
        assert_eq!(t.result("SKU-42.a").unwrap(), "attrd/edge-1/results/SKU-42.a");
        assert_eq!(t.model_state(), "attrd/edge-1/model/state");
        assert_eq!(t.cmd_filter(), "attrd/edge-1/cmd/#");
        let k = CommandKind::new("reload").unwrap();
        assert_eq!(t.cmd(&k), "attrd/edge-1/cmd/reload");
        assert_eq!(t.cmd_response(&k), "attrd/edge-1/cmd/reload/response");
        assert_eq!(t.errors(), "attrd/edge-1/errors");
        assert_eq!(t.models("lite0").unwrap(), "attrd/models/lite0");
        assert_eq!(Topics::new("site/a", "n").unwrap().available(), "site/a/n/available");
    }

    #[test]
    fn a_node_cannot_be_named_like_the_fleets_model_level() {
        // Its own retained status would land under `attrd/models/+`, every node's model subscription, its own too.
        let e = Topics::new("attrd", "models").unwrap_err();
        assert_eq!(e, TopicError::ReservedNode { value: "models".into() });
        assert!(e.to_string().contains("choose another node name"), "{e}");
        assert!(Topics::new("attrd", "models-1").is_ok());
        assert!(Topics::new("models", "edge-1").is_ok(), "as a prefix it is only a name");
    }

    #[test]
    fn rejects_bad_values_instead_of_rewriting() {
        let t = t();
        for bad in ["a/b", "a+b", "a#", "", "a\0b", "line\nbreak", "$SYS"] {
            assert!(t.result(bad).is_err(), "{bad:?} accepted");
            assert!(t.models(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            t.result(&"x".repeat(MAX_SKU_LEN + 1)).unwrap_err(),
            TopicError::TooLong { what: "SKU", len: MAX_SKU_LEN + 1, max: MAX_SKU_LEN }
        );
        assert!(t.result(&"x".repeat(MAX_SKU_LEN)).is_ok());
        assert!(Topics::new("attrd", "a/b").is_err());
        assert!(Topics::new("attrd/", "n").is_err());
        assert!(Topics::new("", "n").is_err());
        assert!(CommandKind::new("re load").is_err());
    }

    #[test]
    fn model_topics_round_trip() {
        let t = t();
        let id = "0123456789abcdef";
        assert_eq!(t.models_filter(None).unwrap(), "attrd/models/+");
        assert_eq!(t.models_filter(Some("fashion")).unwrap(), "attrd/models/fashion");
        let chunk = t.model_chunk("fashion", id, 7).unwrap();
        assert_eq!(chunk, "attrd/models/fashion/chunks/0123456789abcdef/7");
        assert_eq!(t.model_chunks_filter("fashion", id).unwrap(), "attrd/models/fashion/chunks/0123456789abcdef/+");
        assert_eq!(
            t.parse_model(&chunk),
            Some(ModelTopic::Chunk { name: "fashion".into(), transfer: id.into(), index: 7 })
        );
        assert_eq!(t.parse_model("attrd/models/fashion"), Some(ModelTopic::Announcement { name: "fashion".into() }));
        for bad in [
            "attrd/models/fashion/chunks/0123456789abcdef/07",
            "attrd/models/fashion/chunks/0123456789ABCDEF/1",
            "attrd/models/fashion/chunks/0123/1",
            "attrd/models/fashion/chunks/0123456789abcdef/-1",
            "attrd/models/fashion/other",
            "attrd/modelsx/fashion",
            "other/models/fashion",
            "attrd/edge-1/cmd/x",
        ] {
            assert_eq!(t.parse_model(bad), None, "{bad:?} parsed");
        }
        assert!(t.model_chunk("fashion", "xyz", 0).is_err());
        assert!(t.model_chunk("a/b", id, 0).is_err());
    }

    #[test]
    fn parses_command_topics() {
        let t = t();
        let k = CommandKind::new("reload").unwrap();
        assert_eq!(t.parse_command("attrd/edge-1/cmd/reload"), Ok(CommandTopic::Command(k.clone())));
        assert_eq!(t.parse_command("attrd/edge-1/cmd/reload/response"), Ok(CommandTopic::Response(k)));
        for bad in [
            "attrd/edge-1/cmd",
            "attrd/edge-1/cmd/",
            "attrd/edge-1/cmd/a/b",
            "attrd/edge-1/cmdx/a",
            "attrd/edge-2/cmd/a",
            "attrd/edge-1/cmd/bad kind",
        ] {
            assert!(t.parse_command(bad).is_err(), "{bad:?} parsed");
        }
    }
}

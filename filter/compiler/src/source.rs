//! Source documents with a position for every node, so every diagnostic can say file:line:col.
//!
//! YAML (and JSON, which is YAML) is parsed into [`Node`], a small tree that remembers where each
//! value and each mapping key started. Typed deserialization reads the tree directly
//! ([`de`]); a failing field path is mapped back to a position through the tree.

use std::fmt;

/// Position inside one file (1-based).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

/// A parsed value with its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: NodeValue,
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeValue {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys keep their own positions (an error about a key points at the key).
    Map(Vec<(String, Pos, Node)>),
}

/// One segment of a field path such as `spec.http[0].route[1].weight`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A field path inside a document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Seg>);

impl FieldPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    pub fn key(&self, k: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_string()));
        Self(v)
    }

    pub fn idx(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        Self(v)
    }

    /// Parses `spec.http[0].route` (as produced by serde_path_to_error).
    pub fn parse(s: &str) -> Self {
        let mut segs = Vec::new();
        for part in s.split('.') {
            if part.is_empty() || part == "?" {
                continue;
            }
            let mut rest = part;
            if let Some(b) = rest.find('[') {
                if b > 0 {
                    segs.push(Seg::Key(rest[..b].to_string()));
                }
                rest = &rest[b..];
                while let Some(stripped) = rest.strip_prefix('[') {
                    let Some(end) = stripped.find(']') else { break };
                    if let Ok(i) = stripped[..end].parse() {
                        segs.push(Seg::Index(i));
                    }
                    rest = &stripped[end + 1..];
                }
            } else {
                segs.push(Seg::Key(rest.to_string()));
            }
        }
        Self(segs)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in &self.0 {
            match s {
                Seg::Key(k) => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

impl Node {
    /// The value as JSON, positions dropped.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.value {
            NodeValue::Null => Value::Null,
            NodeValue::Bool(b) => Value::Bool(*b),
            NodeValue::Int(i) => Value::from(*i),
            NodeValue::UInt(u) => Value::from(*u),
            NodeValue::Float(f) => {
                serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
            }
            NodeValue::Str(s) => Value::String(s.clone()),
            NodeValue::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeValue::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, _, v)| (k.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            NodeValue::Map(entries) => entries.iter().find(|(k, _, _)| k == key).map(|(_, _, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            NodeValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The position of the deepest node along `path` (a key's own position when the path ends
    /// at a key that is missing its value, the parent's when the path leaves the tree).
    pub fn locate(&self, path: &FieldPath) -> Pos {
        let mut node = self;
        for seg in &path.0 {
            match (seg, &node.value) {
                (Seg::Key(k), NodeValue::Map(entries)) => {
                    match entries.iter().find(|(ek, _, _)| ek == k) {
                        Some((_, _, v)) => node = v,
                        None => return node.pos,
                    }
                }
                (Seg::Index(i), NodeValue::Seq(items)) => match items.get(*i) {
                    Some(v) => node = v,
                    None => return node.pos,
                },
                _ => return node.pos,
            }
        }
        node.pos
    }

    /// The node at `path`, if the tree has one there.
    pub fn at(&self, path: &FieldPath) -> Option<&Node> {
        let mut node = self;
        for seg in &path.0 {
            node = match (seg, &node.value) {
                (Seg::Key(k), NodeValue::Map(entries)) => {
                    &entries.iter().find(|(ek, _, _)| ek == k)?.2
                }
                (Seg::Index(i), NodeValue::Seq(items)) => items.get(*i)?,
                _ => return None,
            };
        }
        Some(node)
    }

    /// The position of the key `key` inside the mapping at `path` (for "unknown field" errors).
    pub fn locate_key(&self, path: &FieldPath, key: &str) -> Option<Pos> {
        match &self.at(path)?.value {
            NodeValue::Map(entries) => entries
                .iter()
                .find(|(k, _, _)| k == key)
                .map(|(_, p, _)| *p),
            _ => None,
        }
    }
}

#[cfg(feature = "yaml")]
mod yaml {
    use std::fmt;

    use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_saphyr::Spanned;

    use super::{Node, NodeValue, Pos};

    /// Parse failure with the position the parser reported.
    #[derive(Debug, Clone)]
    pub struct ParseError {
        pub pos: Pos,
        pub message: String,
    }

    fn clamp(v: u64) -> u32 {
        u32::try_from(v).unwrap_or(u32::MAX)
    }

    struct Raw(NodeValue);

    impl<'de> Deserialize<'de> for Raw {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(RawVisitor)
        }
    }

    fn spanned_to_node(s: Spanned<Raw>) -> Node {
        Node {
            pos: Pos {
                line: clamp(s.referenced.line()),
                col: clamp(s.referenced.column()),
            },
            value: s.value.0,
        }
    }

    struct RawVisitor;

    impl<'de> Visitor<'de> for RawVisitor {
        type Value = Raw;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any YAML value")
        }
        fn visit_unit<E>(self) -> Result<Raw, E> {
            Ok(Raw(NodeValue::Null))
        }
        fn visit_none<E>(self) -> Result<Raw, E> {
            Ok(Raw(NodeValue::Null))
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
            Raw::deserialize(d)
        }
        fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
            Ok(Raw(NodeValue::Bool(v)))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
            Ok(Raw(NodeValue::Int(v)))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
            Ok(Raw(NodeValue::UInt(v)))
        }
        fn visit_i128<E: de::Error>(self, v: i128) -> Result<Raw, E> {
            i64::try_from(v)
                .map(|i| Raw(NodeValue::Int(i)))
                .map_err(|_| E::custom("integer out of range"))
        }
        fn visit_u128<E: de::Error>(self, v: u128) -> Result<Raw, E> {
            u64::try_from(v)
                .map(|i| Raw(NodeValue::UInt(i)))
                .map_err(|_| E::custom("integer out of range"))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
            Ok(Raw(NodeValue::Float(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
            Ok(Raw(NodeValue::Str(v.to_string())))
        }
        fn visit_string<E>(self, v: String) -> Result<Raw, E> {
            Ok(Raw(NodeValue::Str(v)))
        }
        fn visit_bytes<E>(self, v: &[u8]) -> Result<Raw, E> {
            Ok(Raw(NodeValue::Str(String::from_utf8_lossy(v).into_owned())))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<Spanned<Raw>>()? {
                items.push(spanned_to_node(item));
            }
            Ok(Raw(NodeValue::Seq(items)))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
            let mut entries: Vec<(String, Pos, Node)> = Vec::new();
            while let Some(key) = map.next_key::<Spanned<Raw>>()? {
                let kpos = Pos {
                    line: clamp(key.referenced.line()),
                    col: clamp(key.referenced.column()),
                };
                let name = match key.value.0 {
                    NodeValue::Str(s) => s,
                    NodeValue::Int(i) => i.to_string(),
                    NodeValue::UInt(u) => u.to_string(),
                    NodeValue::Bool(b) => b.to_string(),
                    NodeValue::Float(f) => f.to_string(),
                    NodeValue::Null => "null".to_string(),
                    NodeValue::Seq(_) | NodeValue::Map(_) => {
                        return Err(de::Error::custom(format!(
                            "line {}:{}: mapping keys must be scalars",
                            kpos.line, kpos.col
                        )))
                    }
                };
                let value = spanned_to_node(map.next_value::<Spanned<Raw>>()?);
                if entries.iter().any(|(k, _, _)| *k == name) {
                    return Err(de::Error::custom(format!(
                        "duplicate key `{name}` at line {}:{}",
                        kpos.line, kpos.col
                    )));
                }
                entries.push((name, kpos, value));
            }
            Ok(Raw(NodeValue::Map(entries)))
        }
    }

    /// Documents parsed per call; the parser caps documents per stream, a mesh has more.
    const DOCS_PER_CHUNK: usize = 250;

    /// Parses a (multi-document) YAML or JSON text. Empty documents are skipped.
    pub fn parse_documents(text: &str) -> Result<Vec<Node>, ParseError> {
        // A `---` marker at column 0 always starts a document (YAML forbids it inside scalars),
        // so splitting there keeps every document whole.
        let mut chunks: Vec<(u32, &str)> = Vec::new();
        let mut chunk_start = 0usize;
        let mut chunk_line = 0u32;
        let mut markers = 0usize;
        let mut offset = 0usize;
        for (i, line) in text.split_inclusive('\n').enumerate() {
            let is_marker = line.starts_with("---")
                && line[3..].chars().next().is_none_or(|c| c.is_whitespace());
            if is_marker {
                markers += 1;
                if markers > DOCS_PER_CHUNK {
                    chunks.push((chunk_line, &text[chunk_start..offset]));
                    chunk_start = offset;
                    chunk_line = u32::try_from(i).unwrap_or(u32::MAX);
                    markers = 1;
                }
            }
            offset += line.len();
        }
        chunks.push((chunk_line, &text[chunk_start..]));
        let mut out = Vec::new();
        for parsed in parse_chunks(&chunks) {
            out.extend(parsed?);
        }
        Ok(out)
    }

    fn parse_positioned(line_offset: u32, chunk: &str) -> Result<Vec<Node>, ParseError> {
        let mut docs = parse_chunk(chunk).map_err(|mut e| {
            e.pos.line = e.pos.line.saturating_add(line_offset);
            e
        })?;
        for d in &mut docs {
            shift(d, line_offset);
        }
        Ok(docs)
    }

    /// Large streams are parsed on every core (the YAML parser dominates load time); results
    /// keep the order of the chunks.
    #[cfg(not(target_arch = "wasm32"))]
    fn parse_chunks(chunks: &[(u32, &str)]) -> Vec<Result<Vec<Node>, ParseError>> {
        let workers = std::thread::available_parallelism().map_or(1, usize::from);
        if chunks.len() < 2 || workers < 2 {
            return chunks
                .iter()
                .map(|(l, c)| parse_positioned(*l, c))
                .collect();
        }
        let per_worker = chunks.len().div_ceil(workers);
        std::thread::scope(|scope| {
            let handles: Vec<_> = chunks
                .chunks(per_worker)
                .map(|group| {
                    scope.spawn(move || {
                        group
                            .iter()
                            .map(|(l, c)| parse_positioned(*l, c))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![Err(ParseError {
                            pos: Pos::default(),
                            message: "YAML parser failed".into(),
                        })]
                    })
                })
                .collect()
        })
    }

    #[cfg(target_arch = "wasm32")]
    fn parse_chunks(chunks: &[(u32, &str)]) -> Vec<Result<Vec<Node>, ParseError>> {
        chunks
            .iter()
            .map(|(l, c)| parse_positioned(*l, c))
            .collect()
    }

    fn shift(node: &mut Node, lines: u32) {
        if lines == 0 {
            return;
        }
        node.pos.line = node.pos.line.saturating_add(lines);
        match &mut node.value {
            NodeValue::Seq(items) => items.iter_mut().for_each(|n| shift(n, lines)),
            NodeValue::Map(entries) => {
                for (_, kpos, v) in entries {
                    kpos.line = kpos.line.saturating_add(lines);
                    shift(v, lines);
                }
            }
            _ => {}
        }
    }

    fn parse_chunk(text: &str) -> Result<Vec<Node>, ParseError> {
        let docs: Vec<Option<Spanned<Raw>>> = serde_saphyr::from_multiple(text).map_err(|e| {
            let pos = e
                .location()
                .map(|l| Pos {
                    line: clamp(l.line()),
                    col: clamp(l.column()),
                })
                .unwrap_or_default();
            ParseError {
                pos,
                message: first_line(&e.to_string()),
            }
        })?;
        Ok(docs
            .into_iter()
            .flatten()
            .map(spanned_to_node)
            .filter(|n| n.value != NodeValue::Null)
            .collect())
    }

    fn first_line(s: &str) -> String {
        // saphyr renders a snippet after the message; the message is enough for one-line output.
        s.lines().next().unwrap_or(s).trim().to_string()
    }
}

#[cfg(feature = "yaml")]
pub use yaml::{parse_documents, ParseError};

/// Typed deserialization straight from the positioned tree (no intermediate JSON value).
pub mod de {
    use std::fmt;

    use serde::de::value::{BorrowedStrDeserializer, StrDeserializer};
    use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
    use serde::forward_to_deserialize_any;

    use super::{Node, NodeValue, Pos};

    /// A deserialization error; serde's own messages, so they read like serde_json's.
    #[derive(Debug)]
    pub struct Error(String);

    impl fmt::Display for Error {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Error {}

    impl de::Error for Error {
        fn custom<T: fmt::Display>(msg: T) -> Self {
            Self(msg.to_string())
        }
    }

    struct Seq<'a>(std::slice::Iter<'a, Node>);

    impl<'de> SeqAccess<'de> for Seq<'de> {
        type Error = Error;

        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, Error> {
            self.0.next().map(|n| seed.deserialize(n)).transpose()
        }

        fn size_hint(&self) -> Option<usize> {
            Some(self.0.len())
        }
    }

    struct Map<'a> {
        entries: std::slice::Iter<'a, (String, Pos, Node)>,
        value: Option<&'a Node>,
    }

    impl<'de> MapAccess<'de> for Map<'de> {
        type Error = Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Error> {
            match self.entries.next() {
                Some((k, _, v)) => {
                    self.value = Some(v);
                    seed.deserialize(BorrowedStrDeserializer::<Error>::new(k))
                        .map(Some)
                }
                None => Ok(None),
            }
        }

        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
            match self.value.take() {
                Some(v) => seed.deserialize(v),
                None => Err(de::Error::custom("value requested before key")),
            }
        }

        fn size_hint(&self) -> Option<usize> {
            Some(self.entries.len())
        }
    }

    impl<'de> de::Deserializer<'de> for &'de Node {
        type Error = Error;

        fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            match &self.value {
                NodeValue::Null => v.visit_unit(),
                NodeValue::Bool(b) => v.visit_bool(*b),
                NodeValue::Int(i) => v.visit_i64(*i),
                NodeValue::UInt(u) => v.visit_u64(*u),
                NodeValue::Float(f) => v.visit_f64(*f),
                NodeValue::Str(s) => v.visit_borrowed_str(s),
                NodeValue::Seq(items) => v.visit_seq(Seq(items.iter())),
                NodeValue::Map(entries) => v.visit_map(Map {
                    entries: entries.iter(),
                    value: None,
                }),
            }
        }

        fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            match self.value {
                NodeValue::Null => v.visit_none(),
                _ => v.visit_some(self),
            }
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            v: V,
        ) -> Result<V::Value, Error> {
            v.visit_newtype_struct(self)
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            _: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, Error> {
            match &self.value {
                NodeValue::Str(s) => {
                    let d: StrDeserializer<'_, Error> = s.as_str().into_deserializer();
                    v.visit_enum(d)
                }
                _ => Err(de::Error::custom("expected a string for an enumeration")),
            }
        }

        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier ignored_any
        }
    }
}

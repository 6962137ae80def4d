//! The strict WeChat Pay v2 XML codec.
//!
//! A v2 message is a flat `<xml>` element whose children are fields holding text or CDATA. The
//! decoder accepts exactly that and nothing else: no DOCTYPE (so no entity is ever declared, let
//! alone resolved), no other root, no nested elements, no attributes, no repeated field, no
//! invalid UTF-8, nothing over [`MAX_BODY_BYTES`]. Every field is kept, known or not, in document
//! order, because signatures cover fields this version has never heard of.

use indexmap::IndexMap;
use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

/// Largest body the decoder reads. Real v2 messages are a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The fields of one v2 message, in document order. Two `Fields` are equal when they hold the
/// same fields in the same order.
#[derive(Debug, Clone, Default)]
pub struct Fields(IndexMap<String, String>);

impl PartialEq for Fields {
    fn eq(&self, other: &Self) -> bool {
        self.0.iter().eq(other.0.iter())
    }
}

impl Eq for Fields {}

impl Fields {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A field that is present and not empty (the v2 rule treats empty as absent).
    pub fn get_nonempty(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }

    /// Sets a field, keeping its place if it existed.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(name.into(), value.into());
    }

    /// Builder form of [`Fields::insert`].
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.insert(name, value);
        self
    }

    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.0.shift_remove(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Fields {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Fields(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// Why a body was rejected. None of these is ever "half-decoded": a body either yields all of
/// its fields or an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("body is {0} bytes, more than the {MAX_BODY_BYTES} allowed")]
    TooLarge(usize),
    #[error("body is not valid UTF-8")]
    InvalidUtf8,
    #[error("DOCTYPE or entity declarations are not accepted")]
    Doctype,
    #[error("processing instructions are not accepted")]
    ProcessingInstruction,
    #[error("root element is {}, expected <xml>", crate::text::quote(.0))]
    WrongRoot(String),
    #[error("no <xml> root element")]
    NoRoot,
    #[error("field {} contains an element: nested elements are not accepted", crate::text::quote(.0))]
    Nested(String),
    #[error("field {} appears more than once", crate::text::quote(.0))]
    Repeated(String),
    #[error("element {} has attributes, which are not accepted", crate::text::quote(.0))]
    Attributes(String),
    #[error("element name {} is not a valid field name", crate::text::quote(.0))]
    BadName(String),
    #[error("entity reference {} is not accepted", crate::text::quote(.0))]
    Entity(String),
    #[error("character U+{0:04X} is not allowed in XML")]
    InvalidChar(u32),
    #[error("text outside of a field")]
    StrayText,
    #[error("content after the </xml> root element")]
    TrailingContent,
    #[error("malformed XML at byte {position}: {message}")]
    Malformed { position: u64, message: String },
}

/// Decodes a v2 message. See the module documentation for what is rejected.
pub fn decode(body: &[u8]) -> Result<Fields, XmlError> {
    decode_rooted(body, "xml")
}

/// [`decode`] of a document whose root element is `root_name` (a refund notification's
/// decrypted `req_info` is `<root>…</root>`), under the same rules.
pub fn decode_rooted(body: &[u8], root_name: &str) -> Result<Fields, XmlError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(XmlError::TooLarge(body.len()));
    }
    let text = std::str::from_utf8(body).map_err(|_| XmlError::InvalidUtf8)?;
    let mut reader = Reader::from_str(text);
    let config = reader.config_mut();
    config.check_end_names = true;
    config.check_comments = true;
    config.allow_unmatched_ends = false;
    config.allow_dangling_amp = false;
    config.expand_empty_elements = false;
    config.trim_text_start = false;
    config.trim_text_end = false;

    let malformed = |reader: &Reader<&[u8]>, e: quick_xml::Error| XmlError::Malformed {
        position: reader.error_position(),
        // quick-xml's messages quote names from the body.
        message: crate::text::quote(&e.to_string()),
    };

    enum At {
        Prolog,
        InRoot,
        InField(String, String),
        Done,
    }
    let mut at = At::Prolog;
    let mut fields = Fields::new();
    let mut seen_decl = false;

    loop {
        let event = reader.read_event().map_err(|e| malformed(&reader, e))?;
        at = match (at, event) {
            (_, Event::DocType(_)) => return Err(XmlError::Doctype),
            (_, Event::PI(_)) => return Err(XmlError::ProcessingInstruction),
            (at, Event::Comment(_)) => at,
            (At::Prolog, Event::Decl(_)) if !seen_decl => {
                seen_decl = true;
                At::Prolog
            }
            (_, Event::Decl(_)) => {
                return Err(XmlError::Malformed {
                    position: reader.buffer_position(),
                    message: "misplaced XML declaration".into(),
                });
            }
            (at @ (At::Prolog | At::Done), Event::Text(t)) => {
                if !is_whitespace(&t.into_inner()) {
                    return Err(XmlError::StrayText);
                }
                at
            }
            (At::Prolog, Event::Start(e)) => {
                root(&e, root_name)?;
                At::InRoot
            }
            (At::Prolog, Event::Empty(e)) => {
                root(&e, root_name)?;
                At::Done
            }
            (At::Prolog, Event::Eof | Event::End(_)) => return Err(XmlError::NoRoot),
            (At::Prolog, Event::CData(_) | Event::GeneralRef(_)) => {
                return Err(XmlError::StrayText);
            }
            (At::InRoot, Event::Text(t)) => {
                if !is_whitespace(&t.into_inner()) {
                    return Err(XmlError::StrayText);
                }
                At::InRoot
            }
            (At::InRoot, Event::Start(e)) => At::InField(field_name(&e)?, String::new()),
            (At::InRoot, Event::Empty(e)) => {
                let name = field_name(&e)?;
                push(&mut fields, name, String::new())?;
                At::InRoot
            }
            (At::InRoot, Event::End(_)) => At::Done,
            (At::InRoot, Event::CData(_) | Event::GeneralRef(_)) => {
                return Err(XmlError::StrayText);
            }
            (At::InField(name, mut value), Event::Text(t)) => {
                push_checked(&mut value, &t.xml10_content())?;
                At::InField(name, value)
            }
            (At::InField(name, mut value), Event::CData(c)) => {
                push_checked(&mut value, &c.xml10_content())?;
                At::InField(name, value)
            }
            (At::InField(name, mut value), Event::GeneralRef(r)) => {
                let reference = r.into_inner();
                let c = resolve_reference(&reference).map_err(|e| match e {
                    RefError::Unknown => XmlError::Entity(reference.clone().into_owned()),
                    RefError::Invalid(c) => XmlError::InvalidChar(c),
                })?;
                value.push(c);
                At::InField(name, value)
            }
            (At::InField(name, _), Event::Start(_) | Event::Empty(_)) => {
                return Err(XmlError::Nested(name));
            }
            (At::InField(name, value), Event::End(_)) => {
                push(&mut fields, name, value)?;
                At::InRoot
            }
            (At::InRoot | At::InField(..), Event::Eof) => {
                return Err(XmlError::Malformed {
                    position: reader.buffer_position(),
                    message: "unexpected end of body".into(),
                });
            }
            (At::Done, Event::Eof) => return Ok(fields),
            (At::Done, _) => return Err(XmlError::TrailingContent),
        };
    }
}

enum RefError {
    Unknown,
    Invalid(u32),
}

/// The five predefined entities and character references; anything else is refused (there is no
/// DTD, so there is nothing else it could mean).
fn resolve_reference(name: &str) -> Result<char, RefError> {
    let c = match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "apos" => '\'',
        "quot" => '"',
        _ => {
            let code = if let Some(hex) = name.strip_prefix("#x") {
                u32::from_str_radix(hex, 16)
            } else if let Some(dec) = name.strip_prefix('#') {
                dec.parse::<u32>()
            } else {
                return Err(RefError::Unknown);
            };
            let code = code.map_err(|_| RefError::Unknown)?;
            let c = char::from_u32(code).ok_or(RefError::Invalid(code))?;
            if !is_xml_char(c) {
                return Err(RefError::Invalid(code));
            }
            c
        }
    };
    Ok(c)
}

fn root(e: &BytesStart<'_>, root_name: &str) -> Result<(), XmlError> {
    let qname = e.name();
    let name = <_ as AsRef<str>>::as_ref(&qname).to_owned();
    if name != root_name {
        return Err(XmlError::WrongRoot(name));
    }
    if !e.attributes_raw().trim().is_empty() {
        return Err(XmlError::Attributes(name));
    }
    Ok(())
}

fn field_name(e: &BytesStart<'_>) -> Result<String, XmlError> {
    let qname = e.name();
    let name = <_ as AsRef<str>>::as_ref(&qname).to_owned();
    if !is_field_name(&name) {
        return Err(XmlError::BadName(name));
    }
    if !e.attributes_raw().trim().is_empty() {
        return Err(XmlError::Attributes(name));
    }
    Ok(name)
}

fn push(fields: &mut Fields, name: String, value: String) -> Result<(), XmlError> {
    if fields.0.contains_key(&name) {
        return Err(XmlError::Repeated(name));
    }
    fields.0.insert(name, value);
    Ok(())
}

fn push_checked(value: &mut String, s: &str) -> Result<(), XmlError> {
    if let Some(bad) = s.chars().find(|c| !is_xml_char(*c)) {
        return Err(XmlError::InvalidChar(bad as u32));
    }
    value.push_str(s);
    Ok(())
}

fn is_whitespace(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// Field names WeChat uses: an ASCII letter or `_`, then letters, digits, `_`, `-` or `.`.
pub fn is_field_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("xml"))
}

/// Characters XML 1.0 allows in content.
pub fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{0:?} is not a valid field name")]
    BadName(String),
    #[error("field {field} contains U+{code:04X}, which XML cannot carry")]
    InvalidChar { field: String, code: u32 },
}

/// Encodes fields as a v2 `<xml>` message: plain text for simple tokens (numbers, ids), CDATA
/// for other text, escaped text where CDATA cannot carry a value exactly (`]]>` or a carriage
/// return). `decode(encode(f)) == f` for every encodable `f`.
pub fn encode(fields: &Fields) -> Result<String, EncodeError> {
    encode_rooted(fields, "xml")
}

/// [`encode`] under another root element (a refund notification's `req_info` is `<root>`).
pub fn encode_rooted(fields: &Fields, root_name: &str) -> Result<String, EncodeError> {
    let mut out = String::with_capacity(
        64 + fields
            .iter()
            .map(|(k, v)| 2 * k.len() + v.len() + 16)
            .sum::<usize>(),
    );
    out.push('<');
    out.push_str(root_name);
    out.push('>');
    for (name, value) in fields.iter() {
        if !is_field_name(name) {
            return Err(EncodeError::BadName(name.to_owned()));
        }
        if let Some(bad) = value.chars().find(|c| !is_xml_char(*c)) {
            return Err(EncodeError::InvalidChar {
                field: name.to_owned(),
                code: bad as u32,
            });
        }
        out.push('<');
        out.push_str(name);
        out.push('>');
        if value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            out.push_str(value);
        } else if !value.contains("]]>") && !value.contains('\r') {
            out.push_str("<![CDATA[");
            out.push_str(value);
            out.push_str("]]>");
        } else {
            for c in value.chars() {
                match c {
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '&' => out.push_str("&amp;"),
                    '\r' => out.push_str("&#13;"),
                    c => out.push(c),
                }
            }
        }
        out.push_str("</");
        out.push_str(name);
        out.push('>');
    }
    out.push_str("</");
    out.push_str(root_name);
    out.push('>');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        pairs.iter().map(|(k, v)| (*k, *v)).collect()
    }

    #[test]
    fn decodes_text_cdata_and_empty_fields_in_order() {
        let f = decode(
            b"<?xml version=\"1.0\"?>\n<xml>\n  <b><![CDATA[x<y]]></b>\n  <a>1</a><c/><d></d>\n</xml>\n",
        )
        .unwrap();
        assert_eq!(f, fields(&[("b", "x<y"), ("a", "1"), ("c", ""), ("d", "")]));
        assert_eq!(f.get_nonempty("c"), None);
    }

    #[test]
    fn decodes_predefined_and_character_references() {
        let f = decode(b"<xml><a>&lt;&amp;&#x41;&#66;</a></xml>").unwrap();
        assert_eq!(f.get("a"), Some("<&AB"));
    }

    #[test]
    fn rejects_what_is_not_a_flat_xml_message() {
        type Case = (&'static [u8], fn(&XmlError) -> bool);
        let cases: &[Case] = &[
            (
                b"<!DOCTYPE xml [<!ENTITY e \"x\">]><xml><a>&e;</a></xml>",
                |e| matches!(e, XmlError::Doctype),
            ),
            (b"<xml><a>&e;</a></xml>", |e| {
                matches!(e, XmlError::Entity(_))
            }),
            (b"<root><a>1</a></root>", |e| {
                matches!(e, XmlError::WrongRoot(_))
            }),
            (b"<xml><a><b>1</b></a></xml>", |e| {
                matches!(e, XmlError::Nested(_))
            }),
            (b"<xml><a>1</a><a>2</a></xml>", |e| {
                matches!(e, XmlError::Repeated(_))
            }),
            (b"<xml><a x=\"1\">1</a></xml>", |e| {
                matches!(e, XmlError::Attributes(_))
            }),
            (b"<xml><a>1</a></xml><xml/>", |e| {
                matches!(e, XmlError::TrailingContent)
            }),
            (b"<xml>text<a>1</a></xml>", |e| {
                matches!(e, XmlError::StrayText)
            }),
            (b"<xml><a>1</b></xml>", |e| {
                matches!(e, XmlError::Malformed { .. })
            }),
            (b"<xml><a>1</a>", |e| {
                matches!(e, XmlError::Malformed { .. })
            }),
            (b"<xml><a>\xff</a></xml>", |e| {
                matches!(e, XmlError::InvalidUtf8)
            }),
            (b"<xml><a>&#1;</a></xml>", |e| {
                matches!(e, XmlError::InvalidChar(1))
            }),
            (b"<xml><a>\x01</a></xml>", |e| {
                matches!(e, XmlError::InvalidChar(1))
            }),
            (b"<?php x ?><xml/>", |e| {
                matches!(e, XmlError::ProcessingInstruction)
            }),
            (b"", |e| matches!(e, XmlError::NoRoot)),
            (b"   ", |e| matches!(e, XmlError::NoRoot)),
        ];
        for (body, expected) in cases {
            let got = decode(body);
            assert!(
                matches!(&got, Err(e) if expected(e)),
                "{:?} gave {got:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn rejects_bodies_over_the_limit_before_parsing() {
        let mut body = b"<xml><a>".to_vec();
        body.resize(MAX_BODY_BYTES + 1, b'x');
        assert_eq!(decode(&body), Err(XmlError::TooLarge(MAX_BODY_BYTES + 1)));
    }

    #[test]
    fn encodes_like_wechat() {
        let f = fields(&[
            ("appid", "wx2421b1c4370ec43b"),
            ("body", "支付测试"),
            ("total_fee", "1"),
        ]);
        assert_eq!(
            encode(&f).unwrap(),
            "<xml><appid>wx2421b1c4370ec43b</appid><body><![CDATA[支付测试]]></body><total_fee>1</total_fee></xml>"
        );
        assert!(encode(&fields(&[("a b", "1")])).is_err());
        assert!(encode(&fields(&[("a", "\u{0}")])).is_err());
    }

    fn xml_text() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                any::<char>().prop_filter("XML char", |c| is_xml_char(*c)),
                prop::sample::select(vec!['<', '>', '&', ']', '\r', '\n', ' ', '"', '\'']),
            ],
            0..40,
        )
        .prop_map(|cs| cs.into_iter().collect())
    }

    proptest! {
        #[test]
        fn decoder_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&body);
        }

        #[test]
        fn decoder_never_panics_on_near_miss_xml(body in "<xml>(<[a-z_]{1,4}>[^<]{0,8}</[a-z_]{1,4}>|<!\\[CDATA\\[[^\\]]{0,8}\\]\\]>|&[a-z#x0-9]{0,5};|<[a-z]/>){0,6}(</xml>)?") {
            let _ = decode(body.as_bytes());
        }

        #[test]
        fn encode_then_decode_is_identity(
            pairs in proptest::collection::vec(("[A-Za-z_][A-Za-z0-9_.-]{0,12}", xml_text()), 0..12)
        ) {
            let f: Fields = pairs.into_iter().filter(|(k, _)| is_field_name(k)).collect();
            let body = encode(&f).unwrap();
            prop_assert_eq!(decode(body.as_bytes()), Ok(f));
        }
    }
}

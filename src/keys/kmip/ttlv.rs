//! TTLV, the KMIP binary encoding (KMIP 1.4 spec section 9.1): every item is a 3-byte tag,
//! a 1-byte type, a 4-byte big-endian length and a value padded to a multiple of 8 bytes.
//!
//! The decoder is strict where a wrong byte could change meaning: lengths of fixed-size
//! types, structure lengths that children must fill exactly, padding bytes that must be
//! zero, known item types, Booleans of 0 or 1 and UTF-8 text. It is lenient where servers
//! legitimately differ: it keeps every item whatever its tag, and the accessors find
//! children by tag in any order, so unknown tags and reordered fields are skipped.
//!
//! The `kmip-ttlv` crate's low-level readers were not used because they allocate the
//! declared length before reading (a 4 GiB length from a peer allocates 4 GiB) and do not
//! check padding bytes.

use std::fmt;

use zeroize::Zeroizing;

/// Size of the tag, type and length fields that precede every value.
pub const HEADER_LEN: usize = 8;

/// Maximum structure nesting accepted from a peer; KMIP messages nest about 8 deep.
const MAX_DEPTH: usize = 32;

/// TTLV item types (KMIP 1.4 spec section 9.1.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemType {
    Structure = 0x01,
    Integer = 0x02,
    LongInteger = 0x03,
    BigInteger = 0x04,
    Enumeration = 0x05,
    Boolean = 0x06,
    TextString = 0x07,
    ByteString = 0x08,
    DateTime = 0x09,
    Interval = 0x0A,
}

impl ItemType {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => ItemType::Structure,
            0x02 => ItemType::Integer,
            0x03 => ItemType::LongInteger,
            0x04 => ItemType::BigInteger,
            0x05 => ItemType::Enumeration,
            0x06 => ItemType::Boolean,
            0x07 => ItemType::TextString,
            0x08 => ItemType::ByteString,
            0x09 => ItemType::DateTime,
            0x0A => ItemType::Interval,
            _ => return None,
        })
    }
}

/// The value of one TTLV item. Byte strings can hold key material, so they are zeroized on
/// drop and `Debug` prints only their length.
#[derive(PartialEq)]
pub enum Value {
    Structure(Vec<Item>),
    Integer(i32),
    LongInteger(i64),
    BigInteger(Vec<u8>),
    Enumeration(u32),
    Boolean(bool),
    TextString(String),
    ByteString(Zeroizing<Vec<u8>>),
    DateTime(i64),
    Interval(u32),
}

impl Value {
    pub fn item_type(&self) -> ItemType {
        match self {
            Value::Structure(_) => ItemType::Structure,
            Value::Integer(_) => ItemType::Integer,
            Value::LongInteger(_) => ItemType::LongInteger,
            Value::BigInteger(_) => ItemType::BigInteger,
            Value::Enumeration(_) => ItemType::Enumeration,
            Value::Boolean(_) => ItemType::Boolean,
            Value::TextString(_) => ItemType::TextString,
            Value::ByteString(_) => ItemType::ByteString,
            Value::DateTime(_) => ItemType::DateTime,
            Value::Interval(_) => ItemType::Interval,
        }
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Structure(items) => f.debug_list().entries(items).finish(),
            Value::Integer(v) => write!(f, "Integer({v})"),
            Value::LongInteger(v) => write!(f, "LongInteger({v})"),
            Value::BigInteger(v) => write!(f, "BigInteger({} bytes)", v.len()),
            Value::Enumeration(v) => write!(f, "Enumeration({v:#x})"),
            Value::Boolean(v) => write!(f, "Boolean({v})"),
            Value::TextString(v) => write!(f, "TextString({v:?})"),
            Value::ByteString(v) => write!(f, "ByteString({} bytes, [REDACTED])", v.len()),
            Value::DateTime(v) => write!(f, "DateTime({v})"),
            Value::Interval(v) => write!(f, "Interval({v})"),
        }
    }
}

/// One TTLV item: a tag and its value.
#[derive(Debug, PartialEq)]
pub struct Item {
    pub tag: u32,
    pub value: Value,
}

impl Item {
    pub fn new(tag: u32, value: Value) -> Self {
        Item { tag, value }
    }

    pub fn structure(tag: u32, items: Vec<Item>) -> Self {
        Item::new(tag, Value::Structure(items))
    }

    pub fn integer(tag: u32, value: i32) -> Self {
        Item::new(tag, Value::Integer(value))
    }

    pub fn enumeration(tag: u32, value: u32) -> Self {
        Item::new(tag, Value::Enumeration(value))
    }

    pub fn text(tag: u32, value: impl Into<String>) -> Self {
        Item::new(tag, Value::TextString(value.into()))
    }

    pub fn bytes(tag: u32, value: &[u8]) -> Self {
        Item::new(tag, Value::ByteString(Zeroizing::new(value.to_vec())))
    }

    /// Appends the encoding of this item to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tag.to_be_bytes()[1..]);
        out.push(self.value.item_type() as u8);
        let length_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let value_at = out.len();
        match &self.value {
            Value::Structure(items) => items.iter().for_each(|item| item.encode_into(out)),
            Value::Integer(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Enumeration(v) | Value::Interval(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::LongInteger(v) | Value::DateTime(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Boolean(v) => out.extend_from_slice(&u64::from(*v).to_be_bytes()),
            Value::TextString(v) => out.extend_from_slice(v.as_bytes()),
            Value::ByteString(v) => out.extend_from_slice(v),
            Value::BigInteger(v) => out.extend_from_slice(v),
        }
        // Structures count their children's padding; other values count only the value.
        let length = (out.len() - value_at) as u32;
        out[length_at..value_at].copy_from_slice(&length.to_be_bytes());
        out.resize(value_at + padded_len(length as usize), 0);
    }

    /// Encodes this item into a new buffer of exactly the encoded size. Byte strings may be
    /// key material, so the buffer is zeroized on drop and never reallocated while filled,
    /// which would leave copies behind.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(self.encoded_len()));
        self.encode_into(&mut out);
        out
    }

    /// Returns the size of this item's encoding, padding included.
    pub fn encoded_len(&self) -> usize {
        let value_len = match &self.value {
            Value::Structure(items) => items.iter().map(Item::encoded_len).sum(),
            Value::Integer(_) | Value::Enumeration(_) | Value::Interval(_) => 4,
            Value::LongInteger(_) | Value::DateTime(_) | Value::Boolean(_) => 8,
            Value::TextString(v) => v.len(),
            Value::ByteString(v) => v.len(),
            Value::BigInteger(v) => v.len(),
        };
        HEADER_LEN + padded_len(value_len)
    }

    /// Children of a structure, or an empty slice for any other value.
    pub fn children(&self) -> &[Item] {
        match &self.value {
            Value::Structure(items) => items,
            _ => &[],
        }
    }

    /// Returns the first child with `tag`, wherever it sits among its siblings.
    pub fn child(&self, tag: u32) -> Option<&Item> {
        self.children().iter().find(|item| item.tag == tag)
    }

    /// Returns every child with `tag`, in order.
    pub fn children_with(&self, tag: u32) -> impl Iterator<Item = &Item> {
        self.children().iter().filter(move |item| item.tag == tag)
    }
}

/// Kind of fault in a TTLV encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlvErrorKind {
    #[error("input ends inside an item: {needed} more bytes needed")]
    Truncated { needed: usize },
    #[error("unknown item type {0:#04x}")]
    UnknownType(u8),
    #[error("{item_type:?} must have length {expected}, found {actual}")]
    FixedLength { item_type: ItemType, expected: u32, actual: u32 },
    #[error("{item_type:?} length {actual} is not a multiple of 8")]
    UnalignedLength { item_type: ItemType, actual: u32 },
    #[error("item of {len} bytes overruns its enclosing structure by {overrun} bytes")]
    Overrun { len: usize, overrun: usize },
    #[error("padding byte is {0:#04x}, expected 0")]
    NonZeroPadding(u8),
    #[error("Boolean value {0:#x} is neither 0 nor 1")]
    InvalidBoolean(u64),
    #[error("text string is not valid UTF-8")]
    InvalidUtf8,
    #[error("structures nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("{0} bytes follow the top-level item")]
    TrailingBytes(usize),
}

/// A malformed TTLV encoding, with the byte offset of the faulty field and the tags of the
/// structures enclosing it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed TTLV at byte {offset} (tag path {}): {kind}", format_path(.path))]
pub struct TtlvError {
    pub offset: usize,
    pub path: Vec<u32>,
    pub kind: TtlvErrorKind,
}

fn format_path(path: &[u32]) -> String {
    if path.is_empty() {
        return "/".to_string();
    }
    path.iter().map(|tag| format!("{tag:06X}")).collect::<Vec<_>>().join("/")
}

/// Value length rounded up to the next multiple of 8.
pub fn padded_len(len: usize) -> usize {
    len.div_ceil(8) * 8
}

/// Decodes exactly one item that fills all of `input`.
pub fn decode(input: &[u8]) -> Result<Item, TtlvError> {
    let mut decoder = Decoder { input, path: Vec::new() };
    let (item, end) = decoder.item(0, input.len())?;
    if end != input.len() {
        return Err(TtlvError {
            offset: end,
            path: Vec::new(),
            kind: TtlvErrorKind::TrailingBytes(input.len() - end),
        });
    }
    Ok(item)
}

/// Reads the tag, type and value length from the first 8 bytes of a message, so a reader
/// knows how many bytes follow before it allocates for them.
pub fn decode_header(header: &[u8; HEADER_LEN]) -> (u32, u8, u32) {
    let tag = u32::from_be_bytes([0, header[0], header[1], header[2]]);
    let length = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    (tag, header[3], length)
}

struct Decoder<'a> {
    input: &'a [u8],
    path: Vec<u32>,
}

impl Decoder<'_> {
    fn error(&self, offset: usize, kind: TtlvErrorKind) -> TtlvError {
        TtlvError { offset, path: self.path.clone(), kind }
    }

    /// Decodes the item at `at`, which must end by `limit`; returns it and its padded end.
    fn item(&mut self, at: usize, limit: usize) -> Result<(Item, usize), TtlvError> {
        if limit - at < HEADER_LEN {
            return Err(self.error(at, TtlvErrorKind::Truncated { needed: HEADER_LEN - (limit - at) }));
        }
        let header: &[u8; HEADER_LEN] =
            self.input[at..at + HEADER_LEN].try_into().expect("slice has HEADER_LEN bytes");
        let (tag, type_byte, length) = decode_header(header);
        let item_type = ItemType::from_byte(type_byte)
            .ok_or_else(|| self.error(at + 3, TtlvErrorKind::UnknownType(type_byte)))?;
        self.check_length(item_type, length, at + 4)?;

        let value_at = at + HEADER_LEN;
        let value_len = length as usize;
        let end = value_at + padded_len(value_len);
        if end > limit {
            // Within the input, the item overruns its structure; past it, the input is cut.
            let kind = if limit == self.input.len() {
                TtlvErrorKind::Truncated { needed: end - limit }
            } else {
                TtlvErrorKind::Overrun { len: end - at, overrun: end - limit }
            };
            return Err(self.error(at, kind));
        }
        let value = &self.input[value_at..value_at + value_len];
        if let Some(pos) = self.input[value_at + value_len..end].iter().position(|&b| b != 0) {
            let offset = value_at + value_len + pos;
            return Err(self.error(offset, TtlvErrorKind::NonZeroPadding(self.input[offset])));
        }

        let value = match item_type {
            ItemType::Structure => {
                if self.path.len() >= MAX_DEPTH {
                    return Err(self.error(at, TtlvErrorKind::TooDeep));
                }
                self.path.push(tag);
                let mut items = Vec::new();
                let mut child_at = value_at;
                while child_at < end {
                    let (child, child_end) = self.item(child_at, end)?;
                    items.push(child);
                    child_at = child_end;
                }
                self.path.pop();
                Value::Structure(items)
            }
            ItemType::Integer => {
                Value::Integer(i32::from_be_bytes(value.try_into().expect("length checked")))
            }
            ItemType::Enumeration => {
                Value::Enumeration(u32::from_be_bytes(value.try_into().expect("length checked")))
            }
            ItemType::Interval => {
                Value::Interval(u32::from_be_bytes(value.try_into().expect("length checked")))
            }
            ItemType::LongInteger => {
                Value::LongInteger(i64::from_be_bytes(value.try_into().expect("length checked")))
            }
            ItemType::DateTime => {
                Value::DateTime(i64::from_be_bytes(value.try_into().expect("length checked")))
            }
            ItemType::Boolean => match u64::from_be_bytes(value.try_into().expect("length checked")) {
                0 => Value::Boolean(false),
                1 => Value::Boolean(true),
                other => return Err(self.error(value_at, TtlvErrorKind::InvalidBoolean(other))),
            },
            ItemType::TextString => match std::str::from_utf8(value) {
                Ok(text) => Value::TextString(text.to_string()),
                Err(_) => return Err(self.error(value_at, TtlvErrorKind::InvalidUtf8)),
            },
            ItemType::ByteString => Value::ByteString(Zeroizing::new(value.to_vec())),
            ItemType::BigInteger => Value::BigInteger(value.to_vec()),
        };
        Ok((Item { tag, value }, end))
    }

    fn check_length(&self, item_type: ItemType, length: u32, offset: usize) -> Result<(), TtlvError> {
        let fixed = match item_type {
            ItemType::Integer | ItemType::Enumeration | ItemType::Interval => Some(4),
            ItemType::LongInteger | ItemType::Boolean | ItemType::DateTime => Some(8),
            _ => None,
        };
        if let Some(expected) = fixed {
            if length != expected {
                return Err(
                    self.error(offset, TtlvErrorKind::FixedLength { item_type, expected, actual: length })
                );
            }
        }
        if matches!(item_type, ItemType::Structure | ItemType::BigInteger) && length % 8 != 0 {
            return Err(self.error(offset, TtlvErrorKind::UnalignedLength { item_type, actual: length }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A KMIP 1.0 Create response, from KMIP Use Cases 1.0 section 3.1.1 (Create / Destroy).
    const CREATE_RESPONSE_HEX: &str = concat!(
        "42007B01000000C042007A0100000048420069010000002042006A0200000004000000010000000042006B0200000",
        "00400000000000000004200920900000008000000004AFBE7C242000D0200000004000000010000000042000F0100",
        "00006842005C0500000004000000010000000042007F0500000004000000000000000042007C01000000404200570",
        "5000000040000000200000000420094070000002466633838333364652D373064322D346563652D623036332D6665",
        "6465336133633539666500000000"
    );

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }

    fn sample() -> Item {
        Item::structure(
            0x42007B,
            vec![
                Item::integer(0x42006A, 1),
                Item::enumeration(0x42005C, 10),
                Item::text(0x420094, "key-1"),
                Item::bytes(0x420043, &[1, 2, 3]),
                Item::new(0x420006, Value::Boolean(true)),
                Item::new(0x420092, Value::DateTime(1_700_000_000)),
                Item::new(0x420050, Value::LongInteger(-5)),
                Item::structure(0x420040, vec![Item::new(0x420001, Value::Interval(9))]),
            ],
        )
    }

    #[test]
    fn spec_create_response_decodes() {
        let bytes = unhex(CREATE_RESPONSE_HEX);
        let message = decode(&bytes).unwrap();
        assert_eq!(message.tag, 0x42007B);
        let payload = message.child(0x42000F).unwrap().child(0x42007C).unwrap();
        let Value::TextString(id) = &payload.child(0x420094).unwrap().value else { panic!("not text") };
        assert_eq!(id, "fc8833de-70d2-4ece-b063-fede3a3c59fe");
        assert_eq!(*message.encode(), bytes, "re-encoding changes the bytes");
    }

    #[test]
    fn round_trip_keeps_every_type() {
        let item = sample();
        let bytes = item.encode();
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(bytes.len(), item.encoded_len());
        assert_eq!(bytes.capacity(), bytes.len(), "the buffer grew while encoding");
        assert_eq!(decode(&bytes).unwrap(), item);
    }

    #[test]
    fn text_padding_is_minimal() {
        let bytes = Item::text(0x420055, "abc").encode();
        assert_eq!(bytes.len(), 16);
        assert_eq!(&bytes[4..8], &[0, 0, 0, 3]);
    }

    #[test]
    fn nonzero_padding_is_rejected() {
        let mut bytes = Item::integer(0x42006A, 1).encode();
        bytes[15] = 1;
        let err = decode(&bytes).unwrap_err();
        assert_eq!(err.kind, TtlvErrorKind::NonZeroPadding(1));
        assert_eq!(err.offset, 15);
    }

    #[test]
    fn wrong_integer_length_is_rejected() {
        let mut bytes = Item::integer(0x42006A, 1).encode();
        bytes[7] = 8;
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err.kind, TtlvErrorKind::FixedLength { expected: 4, actual: 8, .. }), "{err}");
    }

    #[test]
    fn errors_name_the_tag_path() {
        let mut bytes = sample().encode();
        // The Interval inside the inner structure is the last 16 bytes; break its type.
        let at = bytes.len() - 16 + 3;
        bytes[at] = 0x0B;
        let err = decode(&bytes).unwrap_err();
        assert_eq!(err.path, vec![0x42007B, 0x420040]);
        assert_eq!(err.offset, at);
        assert!(err.to_string().contains("42007B/420040"), "{err}");
    }

    #[test]
    fn huge_declared_length_fails_without_allocating() {
        let mut bytes = Item::bytes(0x420043, &[0; 8]).encode();
        bytes[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err.kind, TtlvErrorKind::Truncated { .. }), "{err}");
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let mut item = Item::integer(0x420001, 0);
        for _ in 0..40 {
            item = Item::structure(0x420002, vec![item]);
        }
        assert_eq!(decode(&item.encode()).unwrap_err().kind, TtlvErrorKind::TooDeep);
    }

    #[test]
    fn byte_strings_are_redacted_in_debug() {
        let printed = format!("{:?}", Item::bytes(0x420043, &[0xAB; 32]));
        assert!(printed.contains("32 bytes"));
        assert!(!printed.contains("171"), "{printed}");
    }

    fn arb_item() -> impl Strategy<Value = Item> {
        let tag = 0x420000u32..0x420200;
        let leaf = (
            tag.clone(),
            prop_oneof![
                any::<i32>().prop_map(Value::Integer),
                any::<i64>().prop_map(Value::LongInteger),
                any::<u32>().prop_map(Value::Enumeration),
                any::<bool>().prop_map(Value::Boolean),
                ".{0,20}".prop_map(Value::TextString),
                proptest::collection::vec(any::<u8>(), 0..40)
                    .prop_map(|v| Value::ByteString(Zeroizing::new(v))),
                (0usize..4).prop_map(|n| Value::BigInteger(vec![0x7f; n * 8])),
                any::<i64>().prop_map(Value::DateTime),
                any::<u32>().prop_map(Value::Interval),
            ],
        )
            .prop_map(|(tag, value)| Item::new(tag, value));
        leaf.prop_recursive(4, 48, 6, move |inner| {
            (tag.clone(), proptest::collection::vec(inner, 0..6))
                .prop_map(|(tag, items)| Item::structure(tag, items))
        })
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(item in arb_item()) {
            prop_assert_eq!(decode(&item.encode()).unwrap(), item);
        }

        #[test]
        fn truncated_input_is_an_error(item in arb_item(), cut in any::<prop::sample::Index>()) {
            let bytes = item.encode();
            let len = cut.index(bytes.len());
            let err = decode(&bytes[..len]).unwrap_err();
            prop_assert!(err.offset <= len, "offset {} past input of {}", err.offset, len);
        }

        #[test]
        fn oversized_input_is_an_error(item in arb_item(), extra in 1usize..32) {
            let mut bytes = item.encode().to_vec();
            bytes.extend(std::iter::repeat_n(0u8, extra));
            prop_assert!(matches!(decode(&bytes).unwrap_err().kind, TtlvErrorKind::TrailingBytes(n) if n == extra));
        }

        #[test]
        fn reordered_children_decode_alike(items in proptest::collection::vec(arb_item(), 1..6), seed in any::<u64>()) {
            let mut shuffled: Vec<Item> = items.iter().map(|i| decode(&i.encode()).unwrap()).collect();
            let n = shuffled.len();
            shuffled.rotate_left((seed as usize) % n);
            let decoded = decode(&Item::structure(0x42007B, shuffled).encode()).unwrap();
            for item in &items {
                prop_assert!(decoded.children_with(item.tag).any(|c| c == item));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn flipped_bytes_never_panic(item in arb_item(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = item.encode();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = decode(&bytes);
        }
    }
}

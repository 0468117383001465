//! KMIP request and response messages with a single batch item (KMIP 1.4 spec section 7).

use zeroize::Zeroizing;

use super::spec::{self, tag, Operation, ProtocolVersion};
use super::ttlv::{self, Item, TtlvError, Value};

/// Largest response accepted, also sent to the server as Maximum Response Size. Responses
/// here carry a key or a short attribute list and stay below 4 KiB.
pub const MAX_RESPONSE_LEN: usize = 64 * 1024;

/// Error in one response.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error(transparent)]
    Malformed(#[from] TtlvError),
    /// The message decoded but does not have the shape KMIP requires.
    #[error("invalid {op} response: {reason}")]
    Invalid { op: &'static str, reason: String },
    /// The server executed the request and reported a failure.
    #[error("{op} failed: {reason_name}{}", .message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Failed { op: &'static str, reason: u32, reason_name: &'static str, message: Option<String> },
}

/// Encodes a request message for `op` with `payload` as the request payload's children.
pub fn encode_request(version: ProtocolVersion, op: Operation, payload: Vec<Item>) -> Zeroizing<Vec<u8>> {
    let header = Item::structure(
        tag::REQUEST_HEADER,
        vec![
            protocol_version_item(version),
            Item::integer(tag::MAXIMUM_RESPONSE_SIZE, MAX_RESPONSE_LEN as i32),
            Item::integer(tag::BATCH_COUNT, 1),
        ],
    );
    let batch_item = Item::structure(
        tag::BATCH_ITEM,
        vec![Item::enumeration(tag::OPERATION, op as u32), Item::structure(tag::REQUEST_PAYLOAD, payload)],
    );
    Item::structure(tag::REQUEST_MESSAGE, vec![header, batch_item]).encode()
}

pub fn protocol_version_item(version: ProtocolVersion) -> Item {
    Item::structure(
        tag::PROTOCOL_VERSION,
        vec![
            Item::integer(tag::PROTOCOL_VERSION_MAJOR, version.major),
            Item::integer(tag::PROTOCOL_VERSION_MINOR, version.minor),
        ],
    )
}

/// Decodes a response message to `op` and returns its response payload (an empty structure
/// when the server sent none), or the failure the server reported.
pub fn decode_response(bytes: &[u8], op: Operation) -> Result<Item, ResponseError> {
    let message = ttlv::decode(bytes)?;
    let invalid = |reason: String| ResponseError::Invalid { op: op.name(), reason };
    if message.tag != tag::RESPONSE_MESSAGE {
        return Err(invalid(format!("top-level tag is {:06X}, expected Response Message", message.tag)));
    }
    if message.child(tag::RESPONSE_HEADER).is_none() {
        return Err(invalid("the Response Header is missing".into()));
    }
    let has_payload = {
        let mut items = message.children_with(tag::BATCH_ITEM);
        let item = items.next().ok_or_else(|| invalid("the Batch Item is missing".into()))?;
        if items.next().is_some() {
            return Err(invalid("more than one Batch Item for a single request".into()));
        }
        check_batch_item(item, op)?;
        item.child(tag::RESPONSE_PAYLOAD).is_some()
    };
    if !has_payload {
        return Ok(Item::structure(tag::RESPONSE_PAYLOAD, Vec::new()));
    }
    match take_payload(message, op)? {
        Value::Structure(children) => Ok(Item::structure(tag::RESPONSE_PAYLOAD, children)),
        _ => Err(invalid("the Response Payload is not a structure".into())),
    }
}

/// Checks that the batch item is the reply to `op` and succeeded, or returns the reported failure.
fn check_batch_item(item: &Item, op: Operation) -> Result<(), ResponseError> {
    let invalid = |reason: String| ResponseError::Invalid { op: op.name(), reason };
    if let Some(Value::Enumeration(echoed)) = item.child(tag::OPERATION).map(|i| &i.value) {
        if *echoed != op as u32 {
            return Err(invalid(format!("the Batch Item answers operation {echoed}")));
        }
    }
    let status = enumeration(item, tag::RESULT_STATUS).map_err(|r| invalid(format!("Result Status {r}")))?;
    if status == spec::RESULT_STATUS_SUCCESS {
        return Ok(());
    }
    let reason = enumeration(item, tag::RESULT_REASON).unwrap_or(0x100);
    let message = text(item, tag::RESULT_MESSAGE).ok().map(|m| truncate(m, 200));
    Err(ResponseError::Failed {
        op: op.name(),
        reason,
        reason_name: spec::result_reason_name(reason),
        message,
    })
}

/// Moves the payload out of the message so byte strings are not copied.
fn take_payload(message: Item, op: Operation) -> Result<Value, ResponseError> {
    let Value::Structure(children) = message.value else {
        return Err(ResponseError::Invalid { op: op.name(), reason: "not a structure".into() });
    };
    let batch_item = children.into_iter().find(|i| i.tag == tag::BATCH_ITEM);
    let Some(Item { value: Value::Structure(fields), .. }) = batch_item else {
        return Err(ResponseError::Invalid {
            op: op.name(),
            reason: "the Batch Item is not a structure".into(),
        });
    };
    let payload = fields.into_iter().find(|i| i.tag == tag::RESPONSE_PAYLOAD).map(|i| i.value);
    payload.ok_or_else(|| ResponseError::Invalid {
        op: op.name(),
        reason: "the Response Payload is missing".into(),
    })
}

fn truncate(text: &str, max_chars: usize) -> String {
    let cut: String = text.chars().take(max_chars).filter(|c| !c.is_control()).collect();
    if cut.len() < text.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

/// Returns the Enumeration child with `tag`, or the reason "is missing" or "has the wrong type".
pub fn enumeration(item: &Item, tag: u32) -> Result<u32, &'static str> {
    match item.child(tag).map(|i| &i.value) {
        Some(Value::Enumeration(v)) => Ok(*v),
        Some(_) => Err("has the wrong type"),
        None => Err("is missing"),
    }
}

/// Returns the Integer child with `tag`.
pub fn integer(item: &Item, tag: u32) -> Result<i32, &'static str> {
    match item.child(tag).map(|i| &i.value) {
        Some(Value::Integer(v)) => Ok(*v),
        Some(_) => Err("has the wrong type"),
        None => Err("is missing"),
    }
}

/// Returns the Text String child with `tag`.
pub fn text(item: &Item, tag: u32) -> Result<&str, &'static str> {
    match item.child(tag).map(|i| &i.value) {
        Some(Value::TextString(v)) => Ok(v),
        Some(_) => Err("has the wrong type"),
        None => Err("is missing"),
    }
}

/// Returns the Byte String child with `tag`.
pub fn bytes(item: &Item, tag: u32) -> Result<&[u8], &'static str> {
    match item.child(tag).map(|i| &i.value) {
        Some(Value::ByteString(v)) => Ok(v),
        Some(_) => Err("has the wrong type"),
        None => Err("is missing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u32, extra: Vec<Item>) -> Vec<u8> {
        let mut batch = vec![
            Item::enumeration(tag::OPERATION, Operation::Get as u32),
            Item::enumeration(tag::RESULT_STATUS, status),
        ];
        batch.extend(extra);
        Item::structure(
            tag::RESPONSE_MESSAGE,
            vec![
                Item::structure(
                    tag::RESPONSE_HEADER,
                    vec![protocol_version_item(ProtocolVersion::V1_2), Item::integer(tag::BATCH_COUNT, 1)],
                ),
                Item::structure(tag::BATCH_ITEM, batch),
            ],
        )
        .encode()
        .to_vec()
    }

    #[test]
    fn success_returns_payload() {
        let bytes = response(
            0,
            vec![Item::structure(tag::RESPONSE_PAYLOAD, vec![Item::text(tag::UNIQUE_IDENTIFIER, "7")])],
        );
        let payload = decode_response(&bytes, Operation::Get).unwrap();
        assert_eq!(text(&payload, tag::UNIQUE_IDENTIFIER), Ok("7"));
    }

    #[test]
    fn failure_names_reason_and_message() {
        let bytes = response(
            1,
            vec![Item::enumeration(tag::RESULT_REASON, 1), Item::text(tag::RESULT_MESSAGE, "no such key")],
        );
        let err = decode_response(&bytes, Operation::Get).unwrap_err();
        assert_eq!(err.to_string(), "Get failed: Item Not Found: no such key");
    }

    #[test]
    fn wrong_operation_is_invalid() {
        let bytes = response(0, vec![]);
        let err = decode_response(&bytes, Operation::Destroy).unwrap_err();
        assert!(matches!(err, ResponseError::Invalid { .. }), "{err}");
    }

    #[test]
    fn request_has_header_and_one_batch_item() {
        let bytes = encode_request(ProtocolVersion::V1_4, Operation::Query, vec![]);
        let message = ttlv::decode(&bytes).unwrap();
        let header = message.child(tag::REQUEST_HEADER).unwrap();
        assert_eq!(integer(header, tag::BATCH_COUNT), Ok(1));
        let version = header.child(tag::PROTOCOL_VERSION).unwrap();
        assert_eq!(integer(version, tag::PROTOCOL_VERSION_MINOR), Ok(4));
        assert_eq!(message.children_with(tag::BATCH_ITEM).count(), 1);
    }
}

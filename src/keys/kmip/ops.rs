//! Request payloads and response checks for the operations the key provider uses. Field
//! order follows the KMIP 1.4 and 2.0 specs, because some servers (PyKMIP among them) parse
//! requests in order. Responses are read by tag, in any order.

use zeroize::Zeroizing;

use super::message::{bytes, enumeration, integer, protocol_version_item, text};
use super::spec::{self, tag, usage, ProtocolVersion};
use super::ttlv::{Item, Value};

/// Reason a response payload is unusable; the caller adds the operation and server.
pub type PayloadError = String;

/// Length in bytes of the AES-256 KEK.
pub const KEK_LEN: usize = 32;

pub fn discover_versions(offered: &[ProtocolVersion]) -> Vec<Item> {
    offered.iter().map(|v| protocol_version_item(*v)).collect()
}

/// Parses the versions the server returned, in its order of preference.
pub fn parse_discover_versions(payload: &Item) -> Result<Vec<ProtocolVersion>, PayloadError> {
    payload
        .children_with(tag::PROTOCOL_VERSION)
        .map(|v| {
            let major =
                integer(v, tag::PROTOCOL_VERSION_MAJOR).map_err(|e| format!("Protocol Version Major {e}"))?;
            let minor =
                integer(v, tag::PROTOCOL_VERSION_MINOR).map_err(|e| format!("Protocol Version Minor {e}"))?;
            Ok(ProtocolVersion { major, minor })
        })
        .collect()
}

/// Create of an AES-256 symmetric key with a usage mask and a Name.
pub fn create_aes256(version: ProtocolVersion, name: &str, usage_mask: i32) -> Vec<Item> {
    let attributes = [
        (
            tag::CRYPTOGRAPHIC_ALGORITHM,
            "Cryptographic Algorithm",
            Value::Enumeration(spec::CRYPTOGRAPHIC_ALGORITHM_AES),
        ),
        (tag::CRYPTOGRAPHIC_LENGTH, "Cryptographic Length", Value::Integer(256)),
        (tag::CRYPTOGRAPHIC_USAGE_MASK, "Cryptographic Usage Mask", Value::Integer(usage_mask)),
        (tag::NAME, "Name", Value::Structure(name_fields(name))),
    ];
    let attributes = attributes_container(version, attributes.into_iter().collect(), tag::TEMPLATE_ATTRIBUTE);
    vec![Item::enumeration(tag::OBJECT_TYPE, spec::OBJECT_TYPE_SYMMETRIC_KEY), attributes]
}

/// Usage mask for a KEK that nbdcrypt fetches to wrap keys itself, or that the KMS uses to
/// encrypt and decrypt them.
pub fn usage_mask(encrypt_mode: bool) -> i32 {
    if encrypt_mode {
        usage::ENCRYPT | usage::DECRYPT
    } else {
        usage::WRAP_KEY | usage::UNWRAP_KEY
    }
}

fn name_fields(name: &str) -> Vec<Item> {
    vec![
        Item::text(tag::NAME_VALUE, name),
        Item::enumeration(tag::NAME_TYPE, spec::NAME_TYPE_UNINTERPRETED_TEXT_STRING),
    ]
}

/// KMIP 1.x wraps each attribute as Attribute{Name, Value} inside `container_1x`; KMIP 2.0
/// puts the tagged values in Attributes.
fn attributes_container(
    version: ProtocolVersion,
    attributes: Vec<(u32, &str, Value)>,
    container_1x: u32,
) -> Item {
    if version.uses_attributes_structure() {
        let items = attributes.into_iter().map(|(tag, _, value)| Item::new(tag, value)).collect();
        return Item::structure(tag::ATTRIBUTES, items);
    }
    let items = attributes
        .into_iter()
        .map(|(_, name, value)| {
            Item::structure(
                tag::ATTRIBUTE,
                vec![Item::text(tag::ATTRIBUTE_NAME, name), Item::new(tag::ATTRIBUTE_VALUE, value)],
            )
        })
        .collect();
    Item::structure(container_1x, items)
}

/// Parses the Unique Identifier in Create, Activate, Revoke, Destroy and other responses.
pub fn parse_unique_identifier(payload: &Item) -> Result<String, PayloadError> {
    let id = text(payload, tag::UNIQUE_IDENTIFIER).map_err(|e| format!("Unique Identifier {e}"))?;
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err("Unique Identifier is empty, longer than 256 bytes or has control characters".into());
    }
    Ok(id.to_string())
}

pub fn unique_identifier(id: &str) -> Vec<Item> {
    vec![Item::text(tag::UNIQUE_IDENTIFIER, id)]
}

/// Get with Key Format Type Raw and no key wrapping.
pub fn get_raw(id: &str) -> Vec<Item> {
    vec![
        Item::text(tag::UNIQUE_IDENTIFIER, id),
        Item::enumeration(tag::KEY_FORMAT_TYPE, spec::KEY_FORMAT_TYPE_RAW),
    ]
}

/// Checks a Get response before its key is used: object type Symmetric Key, format Raw,
/// AES, 256 bits, exactly 32 bytes of key material, no Key Wrapping Data. Returns the key.
pub fn parse_get_aes256(payload: &Item, id: &str) -> Result<Zeroizing<Vec<u8>>, PayloadError> {
    let object_type = enumeration(payload, tag::OBJECT_TYPE).map_err(|e| format!("Object Type {e}"))?;
    if object_type != spec::OBJECT_TYPE_SYMMETRIC_KEY {
        return Err(format!("object {id:?} has Object Type {object_type}, expected Symmetric Key"));
    }
    let returned_id = text(payload, tag::UNIQUE_IDENTIFIER).map_err(|e| format!("Unique Identifier {e}"))?;
    if returned_id != id {
        return Err(format!("response names object {returned_id:?}, requested {id:?}"));
    }
    let key_block = payload
        .child(tag::SYMMETRIC_KEY)
        .and_then(|key| key.child(tag::KEY_BLOCK))
        .ok_or("Symmetric Key or its Key Block is missing")?;
    if key_block.child(tag::KEY_WRAPPING_DATA).is_some() {
        return Err(format!("key {id:?} came wrapped (Key Wrapping Data present); expected a plain key"));
    }
    let format = enumeration(key_block, tag::KEY_FORMAT_TYPE).map_err(|e| format!("Key Format Type {e}"))?;
    if format != spec::KEY_FORMAT_TYPE_RAW {
        return Err(format!("key {id:?} has Key Format Type {format}, expected Raw (1)"));
    }
    let algorithm = enumeration(key_block, tag::CRYPTOGRAPHIC_ALGORITHM)
        .map_err(|e| format!("Cryptographic Algorithm {e}"))?;
    if algorithm != spec::CRYPTOGRAPHIC_ALGORITHM_AES {
        return Err(format!("key {id:?} has Cryptographic Algorithm {algorithm}, expected AES (3)"));
    }
    let length =
        integer(key_block, tag::CRYPTOGRAPHIC_LENGTH).map_err(|e| format!("Cryptographic Length {e}"))?;
    if length != 256 {
        return Err(format!("key {id:?} has Cryptographic Length {length}, expected 256"));
    }
    let key_value = key_block.child(tag::KEY_VALUE).ok_or("Key Value is missing")?;
    let material = bytes(key_value, tag::KEY_MATERIAL).map_err(|e| format!("Key Material {e}"))?;
    if material.len() != KEK_LEN {
        return Err(format!("key {id:?} has {} bytes of Key Material, expected {KEK_LEN}", material.len()));
    }
    Ok(Zeroizing::new(material.to_vec()))
}

/// Get Attributes for the State attribute only.
pub fn get_state(version: ProtocolVersion, id: &str) -> Vec<Item> {
    let reference = if version.uses_attributes_structure() {
        Item::enumeration(tag::ATTRIBUTE_REFERENCE, tag::STATE)
    } else {
        Item::text(tag::ATTRIBUTE_NAME, "State")
    };
    vec![Item::text(tag::UNIQUE_IDENTIFIER, id), reference]
}

/// Parses the State value from a Get Attributes response, in its 1.x or 2.0 layout.
pub fn parse_state(payload: &Item) -> Result<u32, PayloadError> {
    if let Some(attributes) = payload.child(tag::ATTRIBUTES) {
        return enumeration(attributes, tag::STATE).map_err(|e| format!("State {e}"));
    }
    let attribute = payload
        .children_with(tag::ATTRIBUTE)
        .find(|a| text(a, tag::ATTRIBUTE_NAME) == Ok("State"))
        .ok_or("the State attribute is missing")?;
    enumeration(attribute, tag::ATTRIBUTE_VALUE).map_err(|e| format!("State value {e}"))
}

/// Locate by Name.
pub fn locate_by_name(version: ProtocolVersion, name: &str) -> Vec<Item> {
    if version.uses_attributes_structure() {
        return vec![Item::structure(tag::ATTRIBUTES, vec![Item::structure(tag::NAME, name_fields(name))])];
    }
    vec![Item::structure(
        tag::ATTRIBUTE,
        vec![
            Item::text(tag::ATTRIBUTE_NAME, "Name"),
            Item::new(tag::ATTRIBUTE_VALUE, Value::Structure(name_fields(name))),
        ],
    )]
}

/// Parses every Unique Identifier a Locate response lists.
pub fn parse_locate(payload: &Item) -> Result<Vec<String>, PayloadError> {
    payload
        .children_with(tag::UNIQUE_IDENTIFIER)
        .map(|i| match &i.value {
            Value::TextString(id) => Ok(id.clone()),
            _ => Err("Unique Identifier has the wrong type".to_string()),
        })
        .collect()
}

/// Revoke with reason Cessation of Operation: the key is retired, not compromised.
pub fn revoke(id: &str) -> Vec<Item> {
    vec![
        Item::text(tag::UNIQUE_IDENTIFIER, id),
        Item::structure(
            tag::REVOCATION_REASON,
            vec![Item::enumeration(
                tag::REVOCATION_REASON_CODE,
                spec::REVOCATION_REASON_CESSATION_OF_OPERATION,
            )],
        ),
    ]
}

/// Query for operations and server information.
pub fn query() -> Vec<Item> {
    vec![
        Item::enumeration(tag::QUERY_FUNCTION, spec::QUERY_OPERATIONS),
        Item::enumeration(tag::QUERY_FUNCTION, spec::QUERY_SERVER_INFORMATION),
    ]
}

/// Query result: the operation codes and the vendor string.
pub struct QueryInfo {
    pub operations: Vec<u32>,
    pub vendor: Option<String>,
}

pub fn parse_query(payload: &Item) -> QueryInfo {
    let operations = payload
        .children_with(tag::OPERATION)
        .filter_map(|i| match i.value {
            Value::Enumeration(op) => Some(op),
            _ => None,
        })
        .collect();
    let vendor = text(payload, tag::VENDOR_IDENTIFICATION).ok().map(str::to_string);
    QueryInfo { operations, vendor }
}

/// Encrypt or Decrypt with AES-CBC and PKCS#5 padding under `id`, with an explicit IV.
pub fn cbc_crypt(id: &str, data: &[u8], iv: &[u8]) -> Vec<Item> {
    let parameters = Item::structure(
        tag::CRYPTOGRAPHIC_PARAMETERS,
        vec![
            Item::enumeration(tag::BLOCK_CIPHER_MODE, spec::BLOCK_CIPHER_MODE_CBC),
            Item::enumeration(tag::PADDING_METHOD, spec::PADDING_METHOD_PKCS5),
            Item::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, spec::CRYPTOGRAPHIC_ALGORITHM_AES),
        ],
    );
    vec![
        Item::text(tag::UNIQUE_IDENTIFIER, id),
        parameters,
        Item::bytes(tag::DATA, data),
        Item::bytes(tag::IV_COUNTER_NONCE, iv),
    ]
}

/// Parses the Data of an Encrypt or Decrypt response.
pub fn parse_data(payload: &Item) -> Result<Zeroizing<Vec<u8>>, PayloadError> {
    bytes(payload, tag::DATA).map(|d| Zeroizing::new(d.to_vec())).map_err(|e| format!("Data {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_payload(material: &[u8], length: i32, wrapped: bool) -> Item {
        let mut block = vec![
            Item::enumeration(tag::KEY_FORMAT_TYPE, spec::KEY_FORMAT_TYPE_RAW),
            Item::structure(tag::KEY_VALUE, vec![Item::bytes(tag::KEY_MATERIAL, material)]),
            Item::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, spec::CRYPTOGRAPHIC_ALGORITHM_AES),
            Item::integer(tag::CRYPTOGRAPHIC_LENGTH, length),
        ];
        if wrapped {
            block.push(Item::structure(tag::KEY_WRAPPING_DATA, vec![]));
        }
        Item::structure(
            tag::RESPONSE_PAYLOAD,
            vec![
                Item::enumeration(tag::OBJECT_TYPE, spec::OBJECT_TYPE_SYMMETRIC_KEY),
                Item::text(tag::UNIQUE_IDENTIFIER, "5"),
                Item::structure(tag::SYMMETRIC_KEY, vec![Item::structure(tag::KEY_BLOCK, block)]),
            ],
        )
    }

    #[test]
    fn get_accepts_aes256_raw_key() {
        let key = parse_get_aes256(&key_payload(&[7; 32], 256, false), "5").unwrap();
        assert_eq!(key.len(), 32);
    }

    #[test]
    fn get_rejects_short_wrapped_or_foreign_keys() {
        assert!(parse_get_aes256(&key_payload(&[7; 16], 256, false), "5").unwrap_err().contains("16 bytes"));
        assert!(parse_get_aes256(&key_payload(&[7; 32], 128, false), "5")
            .unwrap_err()
            .contains("Length 128"));
        assert!(parse_get_aes256(&key_payload(&[7; 32], 256, true), "5").unwrap_err().contains("wrapped"));
        assert!(parse_get_aes256(&key_payload(&[7; 32], 256, false), "6").unwrap_err().contains("requested"));
    }

    #[test]
    fn state_parses_in_both_layouts() {
        let v1 = Item::structure(
            tag::RESPONSE_PAYLOAD,
            vec![Item::structure(
                tag::ATTRIBUTE,
                vec![Item::text(tag::ATTRIBUTE_NAME, "State"), Item::enumeration(tag::ATTRIBUTE_VALUE, 3)],
            )],
        );
        assert_eq!(parse_state(&v1), Ok(3));
        let v2 = Item::structure(
            tag::RESPONSE_PAYLOAD,
            vec![Item::structure(tag::ATTRIBUTES, vec![Item::enumeration(tag::STATE, 2)])],
        );
        assert_eq!(parse_state(&v2), Ok(2));
    }

    #[test]
    fn create_uses_attributes_in_2_0() {
        let payload = create_aes256(ProtocolVersion::V2_0, "n", 12);
        assert_eq!(payload[1].tag, tag::ATTRIBUTES);
        assert!(payload[1].child(tag::NAME).is_some());
        let payload = create_aes256(ProtocolVersion::V1_2, "n", 12);
        assert_eq!(payload[1].tag, tag::TEMPLATE_ATTRIBUTE);
        assert_eq!(payload[1].children_with(tag::ATTRIBUTE).count(), 4);
    }

    #[test]
    fn locate_by_name_in_1_x_lists_one_attribute() {
        let payload = locate_by_name(ProtocolVersion::V1_0, "n");
        assert_eq!(payload.len(), 1);
        assert_eq!(payload[0].tag, tag::ATTRIBUTE);
    }
}

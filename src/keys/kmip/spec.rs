//! KMIP tags and enumeration values used by the client (KMIP 1.4 spec section 9.1.3 and
//! KMIP 2.0 spec section 11), named after the specification's terms.

/// Item tags.
pub mod tag {
    pub const ATTRIBUTE: u32 = 0x420008;
    pub const ATTRIBUTE_NAME: u32 = 0x42000A;
    pub const ATTRIBUTE_VALUE: u32 = 0x42000B;
    pub const BATCH_COUNT: u32 = 0x42000D;
    pub const BATCH_ITEM: u32 = 0x42000F;
    pub const BLOCK_CIPHER_MODE: u32 = 0x420011;
    pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x420028;
    pub const CRYPTOGRAPHIC_LENGTH: u32 = 0x42002A;
    pub const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42002B;
    pub const CRYPTOGRAPHIC_USAGE_MASK: u32 = 0x42002C;
    pub const IV_COUNTER_NONCE: u32 = 0x42003D;
    pub const KEY_BLOCK: u32 = 0x420040;
    pub const KEY_FORMAT_TYPE: u32 = 0x420042;
    pub const KEY_MATERIAL: u32 = 0x420043;
    pub const KEY_VALUE: u32 = 0x420045;
    pub const KEY_WRAPPING_DATA: u32 = 0x420046;
    pub const MAXIMUM_RESPONSE_SIZE: u32 = 0x420050;
    pub const NAME: u32 = 0x420053;
    pub const NAME_TYPE: u32 = 0x420054;
    pub const NAME_VALUE: u32 = 0x420055;
    pub const OBJECT_TYPE: u32 = 0x420057;
    pub const OPERATION: u32 = 0x42005C;
    pub const PADDING_METHOD: u32 = 0x42005F;
    pub const PROTOCOL_VERSION: u32 = 0x420069;
    pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42006A;
    pub const PROTOCOL_VERSION_MINOR: u32 = 0x42006B;
    pub const QUERY_FUNCTION: u32 = 0x420074;
    pub const REQUEST_HEADER: u32 = 0x420077;
    pub const REQUEST_MESSAGE: u32 = 0x420078;
    pub const REQUEST_PAYLOAD: u32 = 0x420079;
    pub const RESPONSE_HEADER: u32 = 0x42007A;
    pub const RESPONSE_MESSAGE: u32 = 0x42007B;
    pub const RESPONSE_PAYLOAD: u32 = 0x42007C;
    pub const RESULT_MESSAGE: u32 = 0x42007D;
    pub const RESULT_REASON: u32 = 0x42007E;
    pub const RESULT_STATUS: u32 = 0x42007F;
    pub const REVOCATION_REASON: u32 = 0x420081;
    pub const REVOCATION_REASON_CODE: u32 = 0x420082;
    pub const STATE: u32 = 0x42008D;
    pub const SYMMETRIC_KEY: u32 = 0x42008F;
    pub const TEMPLATE_ATTRIBUTE: u32 = 0x420091;
    pub const UNIQUE_IDENTIFIER: u32 = 0x420094;
    pub const VENDOR_IDENTIFICATION: u32 = 0x42009D;
    pub const DATA: u32 = 0x4200C2;
    /// KMIP 2.0: the Attributes structure that replaces Template-Attribute.
    pub const ATTRIBUTES: u32 = 0x420125;
    /// KMIP 2.0: names an attribute in Get Attributes, here by its tag as an Enumeration.
    pub const ATTRIBUTE_REFERENCE: u32 = 0x42013B;
}

/// Operation enumeration (KMIP 1.4 spec section 9.1.3.2.27).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create = 1,
    Locate = 8,
    Get = 10,
    GetAttributes = 11,
    Activate = 18,
    Revoke = 19,
    Destroy = 20,
    Query = 24,
    DiscoverVersions = 30,
    Encrypt = 31,
    Decrypt = 32,
}

impl Operation {
    /// Returns the operation's name as the specification spells it.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Create => "Create",
            Operation::Locate => "Locate",
            Operation::Get => "Get",
            Operation::GetAttributes => "Get Attributes",
            Operation::Activate => "Activate",
            Operation::Revoke => "Revoke",
            Operation::Destroy => "Destroy",
            Operation::Query => "Query",
            Operation::DiscoverVersions => "Discover Versions",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
        }
    }
}

pub const RESULT_STATUS_SUCCESS: u32 = 0;

/// Result Reason names (KMIP 1.4 spec section 9.1.3.2.29).
pub fn result_reason_name(value: u32) -> &'static str {
    match value {
        0x01 => "Item Not Found",
        0x02 => "Response Too Large",
        0x03 => "Authentication Not Successful",
        0x04 => "Invalid Message",
        0x05 => "Operation Not Supported",
        0x06 => "Missing Data",
        0x07 => "Invalid Field",
        0x08 => "Feature Not Supported",
        0x09 => "Operation Canceled By Requester",
        0x0A => "Cryptographic Failure",
        0x0B => "Illegal Operation",
        0x0C => "Permission Denied",
        0x0D => "Object archived",
        0x0E => "Index Out of Bounds",
        0x0F => "Application Namespace Not Supported",
        0x10 => "Key Format Type Not Supported",
        0x11 => "Key Compression Type Not Supported",
        0x100 => "General Failure",
        _ => "unknown reason",
    }
}

pub const RESULT_REASON_INVALID_MESSAGE: u32 = 0x04;
pub const RESULT_REASON_OPERATION_NOT_SUPPORTED: u32 = 0x05;
pub const RESULT_REASON_INVALID_FIELD: u32 = 0x07;

pub const OBJECT_TYPE_SYMMETRIC_KEY: u32 = 2;
pub const CRYPTOGRAPHIC_ALGORITHM_AES: u32 = 3;
pub const KEY_FORMAT_TYPE_RAW: u32 = 1;
pub const NAME_TYPE_UNINTERPRETED_TEXT_STRING: u32 = 1;
pub const QUERY_OPERATIONS: u32 = 1;
pub const QUERY_SERVER_INFORMATION: u32 = 3;
pub const REVOCATION_REASON_CESSATION_OF_OPERATION: u32 = 6;
pub const BLOCK_CIPHER_MODE_CBC: u32 = 1;
pub const PADDING_METHOD_PKCS5: u32 = 3;

/// Cryptographic Usage Mask bits (KMIP 1.4 spec section 9.1.3.3.1).
pub mod usage {
    pub const ENCRYPT: i32 = 0x04;
    pub const DECRYPT: i32 = 0x08;
    pub const WRAP_KEY: i32 = 0x10;
    pub const UNWRAP_KEY: i32 = 0x20;
}

/// State enumeration (KMIP 1.4 spec section 9.1.3.2.24).
pub fn state_name(value: u32) -> &'static str {
    match value {
        1 => "Pre-Active",
        2 => "Active",
        3 => "Deactivated",
        4 => "Compromised",
        5 => "Destroyed",
        6 => "Destroyed Compromised",
        _ => "unknown",
    }
}

pub const STATE_ACTIVE: u32 = 2;

/// A KMIP protocol version, ordered so that a later version compares greater.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    pub major: i32,
    pub minor: i32,
}

impl ProtocolVersion {
    pub const V1_0: ProtocolVersion = ProtocolVersion { major: 1, minor: 0 };
    pub const V1_1: ProtocolVersion = ProtocolVersion { major: 1, minor: 1 };
    pub const V1_2: ProtocolVersion = ProtocolVersion { major: 1, minor: 2 };
    pub const V1_3: ProtocolVersion = ProtocolVersion { major: 1, minor: 3 };
    pub const V1_4: ProtocolVersion = ProtocolVersion { major: 1, minor: 4 };
    pub const V2_0: ProtocolVersion = ProtocolVersion { major: 2, minor: 0 };

    /// Versions this client speaks, highest first, as Discover Versions lists them.
    pub const SUPPORTED: [ProtocolVersion; 6] =
        [Self::V2_0, Self::V1_4, Self::V1_3, Self::V1_2, Self::V1_1, Self::V1_0];

    /// Parses "1.4" or "2.0"; only versions in [`Self::SUPPORTED`] are accepted.
    pub fn parse(text: &str) -> Option<Self> {
        let (major, minor) = text.trim().split_once('.')?;
        let version = ProtocolVersion { major: major.parse().ok()?, minor: minor.parse().ok()? };
        Self::SUPPORTED.contains(&version).then_some(version)
    }

    /// KMIP 2.0 replaced Template-Attribute and Attribute Name with Attributes and
    /// Attribute Reference.
    pub fn uses_attributes_structure(self) -> bool {
        self.major >= 2
    }
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

//! JSON decoding with the rules of Go's `encoding/json`, which is what every
//! Cilium component reads the kvstore with. Where serde's defaults differ, a
//! record that a Cilium agent accepts would be refused by us (or read
//! differently), so the wire structs are decoded through [`from_slice`]:
//!
//! * **Struct fields match case-insensitively.** Go prefers the field whose
//!   name matches exactly and otherwise takes one that matches under Unicode
//!   simple case folding, so `{"name":…,"cluster":…}` fills `Name` and
//!   `Cluster` of a node record.
//! * **A repeated key overwrites.** `{"Name":"a","name":"b"}` (or the same key
//!   twice) leaves the last value, where serde's derive would refuse a
//!   duplicate field.
//! * **`null` is the zero value.** Go sets a slice or map to nil and leaves
//!   every other type untouched, so `null` reads as an empty list or map, `""`,
//!   `0`, `false` or a struct of zero values; an `Option` field reads it as
//!   `None`.
//!
//! Unknown fields are ignored, as Go ignores them. Map keys are data, not
//! field names, so they are matched exactly. The JSON is parsed once into a
//! [`GoValue`] that keeps object members in document order (which "last one
//! wins" needs), then handed to the wire struct's `Deserialize`.

use serde::de::value::{MapDeserializer, SeqDeserializer, StringDeserializer};
use serde::de::{self, DeserializeOwned, Deserializer, IntoDeserializer, Visitor};
use serde::Deserialize;

/// Decodes `bytes` into `T` as Go's `json.Unmarshal` would fill the
/// corresponding Go struct (see the module docs).
pub(crate) fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    let value: GoValue = serde_json::from_slice(bytes)?;
    T::deserialize(value)
}

/// A parsed JSON document whose objects keep their members in order,
/// duplicates included.
#[derive(Debug, Clone, PartialEq)]
enum GoValue {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<GoValue>),
    Object(Vec<(String, GoValue)>),
}

impl<'de> Deserialize<'de> for GoValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;

        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = GoValue;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_unit<E>(self) -> Result<GoValue, E> {
                Ok(GoValue::Null)
            }

            fn visit_none<E>(self) -> Result<GoValue, E> {
                Ok(GoValue::Null)
            }

            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<GoValue, D::Error> {
                GoValue::deserialize(d)
            }

            fn visit_bool<E>(self, b: bool) -> Result<GoValue, E> {
                Ok(GoValue::Bool(b))
            }

            fn visit_u64<E>(self, n: u64) -> Result<GoValue, E> {
                Ok(GoValue::Number(n.into()))
            }

            fn visit_i64<E>(self, n: i64) -> Result<GoValue, E> {
                Ok(GoValue::Number(n.into()))
            }

            fn visit_f64<E: de::Error>(self, n: f64) -> Result<GoValue, E> {
                serde_json::Number::from_f64(n)
                    .map(GoValue::Number)
                    .ok_or_else(|| E::custom("a number that is not finite"))
            }

            fn visit_str<E>(self, s: &str) -> Result<GoValue, E> {
                Ok(GoValue::String(s.to_owned()))
            }

            fn visit_string<E>(self, s: String) -> Result<GoValue, E> {
                Ok(GoValue::String(s))
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<GoValue, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(GoValue::Array(out))
            }

            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<GoValue, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1024));
                while let Some(entry) = map.next_entry::<String, GoValue>()? {
                    out.push(entry);
                }
                Ok(GoValue::Object(out))
            }
        }

        deserializer.deserialize_any(ValueVisitor)
    }
}

/// Whether a JSON key names `field` under Go's case folding. Our field names
/// are ASCII; a key character matches a field character when they are equal
/// or equal after lower- or upper-casing (so `ſ`, U+017F, matches `s` and
/// the Kelvin sign matches `k`, as in Go's `bytes.EqualFold`).
fn fold_eq(key: &str, field: &str) -> bool {
    let same = |k: char, f: char| {
        k == f || k.to_lowercase().eq(f.to_lowercase()) || k.to_uppercase().eq(f.to_uppercase())
    };
    key.chars().count() == field.chars().count()
        && key.chars().zip(field.chars()).all(|(k, f)| same(k, f))
}

/// The members of a JSON object as Go assigns them to a struct with
/// `fields`: each key renamed to the field it fills (exact match first, then
/// case-folded), a later member for the same field replacing the earlier.
/// Members that fill no field are dropped, as Go ignores them; so the result
/// has at most one member per field and the work stays linear in the
/// object's size.
fn fold_members(
    members: Vec<(String, GoValue)>,
    fields: &'static [&'static str],
) -> Vec<(&'static str, GoValue)> {
    let mut out: Vec<(&'static str, GoValue)> = Vec::with_capacity(fields.len());
    for (key, value) in members {
        let Some(field) = fields
            .iter()
            .find(|f| **f == key)
            .or_else(|| fields.iter().find(|f| fold_eq(&key, f)))
        else {
            continue;
        };
        match out.iter_mut().find(|(k, _)| k == field) {
            Some(slot) => slot.1 = value,
            None => out.push((field, value)),
        }
    }
    out
}

impl GoValue {
    fn unexpected(&self) -> de::Unexpected<'_> {
        match self {
            Self::Null => de::Unexpected::Unit,
            Self::Bool(b) => de::Unexpected::Bool(*b),
            Self::Number(_) => de::Unexpected::Other("number"),
            Self::String(s) => de::Unexpected::Str(s),
            Self::Array(_) => de::Unexpected::Seq,
            Self::Object(_) => de::Unexpected::Map,
        }
    }

    fn invalid<'de, V: Visitor<'de>>(&self, visitor: &V) -> serde_json::Error {
        de::Error::invalid_type(self.unexpected(), visitor)
    }
}

fn visit_members<'de, K, V>(members: Vec<(K, GoValue)>, visitor: V) -> serde_json::Result<V::Value>
where
    K: IntoDeserializer<'de, serde_json::Error>,
    V: Visitor<'de>,
{
    let mut map = MapDeserializer::new(members.into_iter());
    let value = visitor.visit_map(&mut map)?;
    map.end()?;
    Ok(value)
}

fn visit_elements<'de, V: Visitor<'de>>(
    elements: Vec<GoValue>,
    visitor: V,
) -> serde_json::Result<V::Value> {
    let mut seq = SeqDeserializer::new(elements.into_iter());
    let value = visitor.visit_seq(&mut seq)?;
    seq.end()?;
    Ok(value)
}

impl IntoDeserializer<'_, serde_json::Error> for GoValue {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

/// A number, or `null` read as the zero value of the number type.
macro_rules! number {
    ($($method:ident => $zero:ident($z:expr)),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
            match self {
                Self::Null => visitor.$zero($z),
                Self::Number(n) => n.deserialize_any(visitor),
                other => Err(other.invalid(&visitor)),
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for GoValue {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        match self {
            Self::Null => visitor.visit_unit(),
            Self::Bool(b) => visitor.visit_bool(b),
            Self::Number(n) => n.deserialize_any(visitor),
            Self::String(s) => visitor.visit_string(s),
            Self::Array(a) => visit_elements(a, visitor),
            Self::Object(o) => visit_members(o, visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        match self {
            Self::Null => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        match self {
            Self::Null => visit_members(Vec::<(&str, GoValue)>::new(), visitor),
            Self::Object(members) => visit_members(fold_members(members, fields), visitor),
            other => Err(other.invalid(&visitor)),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        match self {
            Self::Null => visit_members(Vec::<(String, GoValue)>::new(), visitor),
            Self::Object(members) => visit_members(members, visitor),
            other => Err(other.invalid(&visitor)),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        match self {
            Self::Null => visit_elements(Vec::new(), visitor),
            Self::Array(elements) => visit_elements(elements, visitor),
            other => Err(other.invalid(&visitor)),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        match self {
            Self::Null => visitor.visit_str(""),
            Self::String(s) => visitor.visit_string(s),
            other => Err(other.invalid(&visitor)),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        self.deserialize_string(visitor)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        match self {
            Self::Null => visitor.visit_bool(false),
            Self::Bool(b) => visitor.visit_bool(b),
            other => Err(other.invalid(&visitor)),
        }
    }

    number! {
        deserialize_u8 => visit_u64(0),
        deserialize_u16 => visit_u64(0),
        deserialize_u32 => visit_u64(0),
        deserialize_u64 => visit_u64(0),
        deserialize_i8 => visit_i64(0),
        deserialize_i16 => visit_i64(0),
        deserialize_i32 => visit_i64(0),
        deserialize_i64 => visit_i64(0),
        deserialize_f32 => visit_f64(0.0),
        deserialize_f64 => visit_f64(0.0),
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        match self {
            Self::String(s) => visitor.visit_enum(StringDeserializer::<serde_json::Error>::new(s)),
            other => Err(other.invalid(&visitor)),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        char bytes byte_buf unit unit_struct tuple tuple_struct identifier i128 u128
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, PartialEq, Deserialize)]
    #[serde(default)]
    struct Inner {
        #[serde(rename = "IP")]
        ip: String,
    }

    #[derive(Debug, Default, PartialEq, Deserialize)]
    #[serde(default)]
    struct Record {
        #[serde(rename = "Name")]
        name: String,
        #[serde(rename = "ClusterID")]
        cluster_id: u32,
        #[serde(rename = "Ok")]
        ok: bool,
        #[serde(rename = "List")]
        list: Vec<Inner>,
        #[serde(rename = "Labels")]
        labels: BTreeMap<String, String>,
        #[serde(rename = "Maybe")]
        maybe: Option<Inner>,
        #[serde(rename = "Nested")]
        nested: Inner,
    }

    fn decode(json: &str) -> Record {
        from_slice(json.as_bytes()).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    #[test]
    fn field_names_match_as_in_go() {
        let r = decode(
            r#"{"name":"n1","CLUSTERID":3,"ok":true,"list":[{"ip":"10.0.0.1"}],"nested":{"Ip":"x"}}"#,
        );
        assert_eq!(r.name, "n1");
        assert_eq!(r.cluster_id, 3);
        assert!(r.ok);
        assert_eq!(
            r.list,
            [Inner {
                ip: "10.0.0.1".into()
            }]
        );
        assert_eq!(r.nested.ip, "x");
        // Unicode simple folding: the long s and the Kelvin sign.
        assert!(fold_eq("ſ", "s") && fold_eq("\u{212a}", "k") && fold_eq("Ok", "oK"));
        assert!(!fold_eq("Okay", "Ok"));
    }

    #[test]
    fn map_keys_are_data_and_match_exactly() {
        let r = decode(r#"{"Labels":{"App":"a","app":"b"}}"#);
        assert_eq!(r.labels.len(), 2);
    }

    #[test]
    fn unknown_members_are_ignored_however_many() {
        let mut json = String::from("{");
        for i in 0..100_000 {
            json.push_str(&format!("\"x{i}\":{i},"));
        }
        json.push_str("\"Name\":\"n\"}");
        assert_eq!(decode(&json).name, "n");
    }

    #[test]
    fn the_last_member_for_a_field_wins() {
        assert_eq!(decode(r#"{"Name":"a","name":"b"}"#).name, "b");
        assert_eq!(decode(r#"{"name":"a","Name":"b"}"#).name, "b");
        assert_eq!(decode(r#"{"Name":"a","Name":"c"}"#).name, "c");
    }

    #[test]
    fn null_is_the_zero_value() {
        let r = decode(
            r#"{"Name":null,"ClusterID":null,"Ok":null,"List":null,"Labels":null,"Maybe":null,"Nested":null}"#,
        );
        assert_eq!(r, Record::default());
        assert_eq!(decode("null"), Record::default());
        assert_eq!(
            decode(r#"{"Maybe":{"IP":"y"}}"#).maybe,
            Some(Inner { ip: "y".into() })
        );
    }

    #[test]
    fn wrong_types_are_still_refused() {
        for bad in [
            r#"{"Name":3}"#,
            r#"{"ClusterID":"3"}"#,
            r#"{"ClusterID":-1}"#,
            r#"{"ClusterID":1.5}"#,
            r#"{"List":{}}"#,
            r#"{"Labels":[]}"#,
            r#"[]"#,
        ] {
            assert!(from_slice::<Record>(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}

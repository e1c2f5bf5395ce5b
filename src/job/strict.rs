//! Strict JSON for job bodies: parses like `serde_json::Value` in one pass over the bytes, but
//! refuses an object that names a key twice, at any depth. serde_json keeps the last value of a
//! duplicate silently, so a job with two `job_id`s would be sent under one the producer may not
//! have meant. Used by [`super::decode`] in place of `serde_json::from_slice::<Value>`.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A key named twice in one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Duplicate {
    /// Dotted path of the object, `job` for the top level (e.g. `message.text`).
    pub(crate) path: String,
    /// The key named twice.
    pub(crate) key: String,
}

/// Why a body is not strict JSON.
#[derive(Debug)]
pub(crate) enum StrictError {
    /// An object names a key twice.
    Duplicate(Duplicate),
    /// Not JSON at all.
    Json(serde_json::Error),
}

/// Parses `body`, refusing duplicate keys.
pub(crate) fn parse(body: &[u8]) -> Result<Value, StrictError> {
    let found = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let seed = Node {
        path: &Path::Root,
        found: &found,
    };
    let parsed = seed
        .deserialize(&mut deserializer)
        .and_then(|value| deserializer.end().map(|()| value));
    // The duplicate, if any, is the reason the parse stopped.
    match (parsed, found.into_inner()) {
        (_, Some(duplicate)) => Err(StrictError::Duplicate(duplicate)),
        (Ok(value), None) => Ok(value),
        (Err(e), None) => Err(StrictError::Json(e)),
    }
}

/// Where a value sits; formatted only when a duplicate is found, so parsing allocates no paths.
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => f.write_str("job"),
            Path::Key(Path::Root, key) => f.write_str(key),
            Path::Key(parent, key) => write!(f, "{parent}.{key}"),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// One value to parse, at `path`; a duplicate found inside is put in `found`.
#[derive(Clone, Copy)]
struct Node<'p, 'f> {
    path: &'p Path<'p>,
    found: &'f RefCell<Option<Duplicate>>,
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json never yields a non-finite float, so this is never Null in practice.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        loop {
            let path = Path::Index(self.path, items.len());
            let node = Node {
                path: &path,
                found: self.found,
            };
            match seq.next_element_seed(node)? {
                Some(item) => items.push(item),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                let duplicate = Duplicate {
                    path: self.path.to_string(),
                    key,
                };
                let message = format!("duplicate key {:?} in {}", duplicate.key, duplicate.path);
                *self.found.borrow_mut() = Some(duplicate);
                return Err(de::Error::custom(message));
            }
            let path = Path::Key(self.path, &key);
            let value = map.next_value_seed(Node {
                path: &path,
                found: self.found,
            })?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duplicate(body: &str) -> Option<(String, String)> {
        match parse(body.as_bytes()) {
            Err(StrictError::Duplicate(d)) => Some((d.path, d.key)),
            Ok(_) => None,
            Err(StrictError::Json(e)) => panic!("{body}: not JSON: {e}"),
        }
    }

    #[test]
    fn parses_what_serde_json_parses_when_no_key_repeats() {
        let body = r#"{"a":[1,-2,3.5,"x",null,true,{"b":{}}],"c":{"d":[[]]},"e":"\u00e9"}"#;
        let strict = parse(body.as_bytes()).expect("strict JSON");
        let lax: Value = serde_json::from_str(body).unwrap();
        assert_eq!(strict, lax);
    }

    #[test]
    fn a_key_named_twice_is_refused_with_its_path_at_any_depth() {
        let cases = [
            (r#"{"job_id":"a","job_id":"b"}"#, ("job", "job_id")),
            (
                r#"{"message":{},"to":"1","message":{}}"#,
                ("job", "message"),
            ),
            (
                r#"{"message":{"text":{"body":"a","body":"b"}}}"#,
                ("message.text", "body"),
            ),
            (
                r#"{"m":{"components":[{},{"type":"x","type":"y"}]}}"#,
                ("m.components[1]", "type"),
            ),
            (r#"[{"a":1},{"a":2,"a":3}]"#, ("job[1]", "a")),
        ];
        for (body, (path, key)) in cases {
            assert_eq!(
                duplicate(body),
                Some((path.to_owned(), key.to_owned())),
                "{body}"
            );
        }
    }

    #[test]
    fn the_same_key_in_sibling_objects_is_no_duplicate() {
        assert_eq!(
            duplicate(r#"{"a":{"k":1},"b":{"k":1},"c":[{"k":1},{"k":2}]}"#),
            None
        );
    }

    #[test]
    fn what_is_not_json_stays_a_json_error() {
        for body in ["{not json", "{\"a\":1} trailing", ""] {
            assert!(
                matches!(parse(body.as_bytes()), Err(StrictError::Json(_))),
                "{body}"
            );
        }
    }
}

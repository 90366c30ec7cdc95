//! JSON on the command line ↔ MessagePack on the wire.

use serde_json::{Map, Number, Value as Json};

/// Encode a JSON value as MessagePack (maps stay maps, integers stay integers).
pub fn json_to_msgpack(v: &Json) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(v).map_err(|e| e.to_string())
}

/// A `--payload` argument: JSON text, encoded as MessagePack; the error says which flag is wrong.
pub fn payload_arg(json: &str) -> Result<Vec<u8>, String> {
    let v: Json = serde_json::from_str(json).map_err(|e| format!("--payload is not valid JSON: {e}"))?;
    json_to_msgpack(&v).map_err(|e| format!("cannot encode --payload: {e}"))
}

/// Print a usage error and return exit status 2.
pub fn usage_error(msg: impl std::fmt::Display) -> std::process::ExitCode {
    eprintln!("error: {msg}");
    std::process::ExitCode::from(2)
}

/// Decode MessagePack into JSON for printing. Binary becomes an array of byte values;
/// non-string map keys are rendered as strings.
pub fn msgpack_to_json(bytes: &[u8]) -> Result<Json, String> {
    let v: rmpv::Value = rmpv::decode::read_value(&mut &bytes[..]).map_err(|e| e.to_string())?;
    Ok(to_json(&v))
}

fn to_json(v: &rmpv::Value) -> Json {
    use rmpv::Value as M;
    match v {
        M::Nil => Json::Null,
        M::Boolean(b) => Json::Bool(*b),
        M::Integer(i) => {
            if let Some(u) = i.as_u64() {
                Json::Number(u.into())
            } else if let Some(s) = i.as_i64() {
                Json::Number(s.into())
            } else {
                Json::Null
            }
        }
        M::F32(f) => Number::from_f64(f64::from(*f)).map_or(Json::Null, Json::Number),
        M::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        M::String(s) => Json::String(s.as_str().map_or_else(|| String::from_utf8_lossy(s.as_bytes()).into_owned(), str::to_string)),
        M::Binary(b) => Json::Array(b.iter().map(|x| Json::Number((*x).into())).collect()),
        M::Array(a) => Json::Array(a.iter().map(to_json).collect()),
        M::Map(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match k {
                    M::String(s) => s.as_str().unwrap_or_default().to_string(),
                    other => to_json(other).to_string(),
                };
                out.insert(key, to_json(v));
            }
            Json::Object(out)
        }
        M::Ext(_, _) => Json::Null,
    }
}

/// Whether two MessagePack encodings hold the same value.
pub fn same_value(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    match (rmpv::decode::read_value(&mut &a[..]), rmpv::decode::read_value(&mut &b[..])) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_json() {
        let j: Json = serde_json::from_str(r#"{"a": [1, -2, 3.5, "x", null, true], "b": {"c": 18446744073709551615}}"#).unwrap();
        let m = json_to_msgpack(&j).unwrap();
        assert_eq!(msgpack_to_json(&m).unwrap(), j);
        assert!(same_value(&m, &m));
        assert!(!same_value(&m, &json_to_msgpack(&Json::Null).unwrap()));
    }
}

//! The head of one MessagePack value — its marker, its lengths, an ext's type — read without
//! decoding the value: what the bounded walkers of this crate (`check_map_value`,
//! `inline_buffers`) step with. Owns no walk itself.

/// What a value's head says follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    /// Values that follow as its elements (an array's items, a map's keys and values).
    pub elements: u64,
    /// Bytes of its body (a scalar's, a string's, a bin's, an ext's data).
    pub body: u64,
    /// For an ext: its type.
    pub ext: Option<i8>,
}

fn take(rd: &mut &[u8], n: usize) -> Result<u64, &'static str> {
    let (head, rest) = rd.split_at_checked(n).ok_or("value cut short")?;
    *rd = rest;
    Ok(head.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

/// Read one value's head from `rd`, leaving `rd` at its body, or at its first element.
pub(crate) fn read_head(rd: &mut &[u8]) -> Result<Head, &'static str> {
    use rmp::Marker as M;
    let marker = rmp::decode::read_marker(rd).map_err(|_| "value cut short")?;
    let scalar = |body| Ok(Head { elements: 0, body, ext: None });
    let container = |elements| Ok(Head { elements, body: 0, ext: None });
    let ext = |rd: &mut &[u8], body| Ok(Head { elements: 0, body, ext: Some(take(rd, 1)? as u8 as i8) });
    match marker {
        M::FixPos(_) | M::FixNeg(_) | M::Null | M::True | M::False => scalar(0),
        M::U8 | M::I8 => scalar(1),
        M::U16 | M::I16 => scalar(2),
        M::U32 | M::I32 | M::F32 => scalar(4),
        M::U64 | M::I64 | M::F64 => scalar(8),
        M::FixStr(n) => scalar(u64::from(n)),
        M::Str8 | M::Bin8 => scalar(take(rd, 1)?),
        M::Str16 | M::Bin16 => scalar(take(rd, 2)?),
        M::Str32 | M::Bin32 => scalar(take(rd, 4)?),
        M::FixExt1 => ext(rd, 1),
        M::FixExt2 => ext(rd, 2),
        M::FixExt4 => ext(rd, 4),
        M::FixExt8 => ext(rd, 8),
        M::FixExt16 => ext(rd, 16),
        M::Ext8 => {
            let n = take(rd, 1)?;
            ext(rd, n)
        }
        M::Ext16 => {
            let n = take(rd, 2)?;
            ext(rd, n)
        }
        M::Ext32 => {
            let n = take(rd, 4)?;
            ext(rd, n)
        }
        M::FixArray(n) => container(u64::from(n)),
        M::Array16 => container(take(rd, 2)?),
        M::Array32 => container(take(rd, 4)?),
        M::FixMap(n) => container(2 * u64::from(n)),
        M::Map16 => container(2 * take(rd, 2)?),
        M::Map32 => container(2 * take(rd, 4)?),
        M::Reserved => Err("byte 0xc1 is not MessagePack"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_of_every_kind() {
        let head = |bytes: &[u8]| {
            let mut rd = bytes;
            read_head(&mut rd).map(|h| (h, bytes.len() - rd.len()))
        };
        assert_eq!(head(&[0x05]), Ok((Head { elements: 0, body: 0, ext: None }, 1)));
        assert_eq!(head(&[0xcd, 1, 2]), Ok((Head { elements: 0, body: 2, ext: None }, 1)));
        assert_eq!(head(&[0xc5, 1, 0]), Ok((Head { elements: 0, body: 256, ext: None }, 3)));
        assert_eq!(head(&[0xd6, 80, 0, 0, 0, 1]), Ok((Head { elements: 0, body: 4, ext: Some(80) }, 2)));
        assert_eq!(head(&[0xc7, 3, 0xff]), Ok((Head { elements: 0, body: 3, ext: Some(-1) }, 3)));
        assert_eq!(head(&[0xdf, 0, 0, 0, 2]), Ok((Head { elements: 4, body: 0, ext: None }, 5)));
        assert_eq!(head(&[0xc1]), Err("byte 0xc1 is not MessagePack"));
        assert_eq!(head(&[0xc6, 0]), Err("value cut short"));
        assert_eq!(head(&[]), Err("value cut short"));
    }
}

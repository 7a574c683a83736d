//! MQTT's wire primitives, shared by the CONNECT reader ([`crate::connect`]) and the
//! packet inspection ([`crate::inspect`]): a bounds-checked reader over one packet body,
//! and the variable-length integer.

/// What was wrong with the bytes, for people.
pub(crate) type Malformed = &'static str;

/// Reads one packet body front to back; every read is bounds-checked.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
    /// Where the next read starts.
    pub(crate) at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Reader { b, at: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("truncated")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, Malformed> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    /// Binary data: a two-byte length, then the bytes.
    pub(crate) fn binary(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    /// A UTF-8 string: a two-byte length, then the text.
    pub(crate) fn str(&mut self) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.binary()?).map_err(|_| "bad UTF-8")
    }

    pub(crate) fn varint(&mut self) -> Result<usize, Malformed> {
        let mut n = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            n |= ((b & 0x7f) as usize) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err("bad length")
    }

    /// MQTT 5 properties, skipped whole: their length, then that many bytes.
    pub(crate) fn properties(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.varint()?;
        self.take(n)
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        &self.b[self.at..]
    }
}

/// Appends `n` as an MQTT variable-length integer.
pub(crate) fn write_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// A whole packet: the header byte, the remaining length, the body.
pub(crate) fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![header];
    write_varint(&mut p, body.len());
    p.extend_from_slice(body);
    p
}

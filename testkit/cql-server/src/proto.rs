//! CQL native protocol v4 framing: bounds-checked request decoding and
//! response encoding. Nothing here panics on malformed input; every problem
//! becomes a `ProtocolError`.

use kassandra::{
    cql::schema::ColumnType, error::DbError, frame::response::error::Error,
    frame::response::result::Row,
};

use crate::db::{BatchItem, Options, Outcome, RowSet, Value};

pub const HEADER_LEN: usize = 9;
/// Largest request body accepted (Cassandra's historical default).
pub const MAX_BODY_LEN: usize = 256 << 20;
pub const REQUEST_VERSION: u8 = 0x04;
pub const RESPONSE_VERSION: u8 = 0x84;

/// Frame flags.
pub const FLAG_COMPRESSION: u8 = 0x01;
pub const FLAG_CUSTOM_PAYLOAD: u8 = 0x04;

pub mod opcode {
    pub const ERROR: u8 = 0x00;
    pub const STARTUP: u8 = 0x01;
    pub const READY: u8 = 0x02;
    pub const OPTIONS: u8 = 0x05;
    pub const SUPPORTED: u8 = 0x06;
    pub const QUERY: u8 = 0x07;
    pub const RESULT: u8 = 0x08;
    pub const PREPARE: u8 = 0x09;
    pub const EXECUTE: u8 = 0x0A;
    pub const REGISTER: u8 = 0x0B;
    pub const BATCH: u8 = 0x0D;
    pub const AUTH_RESPONSE: u8 = 0x0F;
}

#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub version: u8,
    pub flags: u8,
    pub stream: i16,
    pub opcode: u8,
    pub length: usize,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            version: b[0],
            flags: b[1],
            stream: i16::from_be_bytes([b[2], b[3]]),
            opcode: b[4],
            length: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) as usize,
        }
    }
}

pub fn protocol_error(msg: impl Into<String>) -> Error {
    Error::new(DbError::ProtocolError, msg.into())
}

/// Bounds-checked cursor over a request body.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(protocol_error("request body is truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, Error> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i64(&mut self) -> Result<i64, Error> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    fn utf8(b: &'a [u8]) -> Result<&'a str, Error> {
        std::str::from_utf8(b).map_err(|_| protocol_error("string is not valid UTF-8"))
    }

    /// `[string]`: u16 length + UTF-8.
    pub fn string(&mut self) -> Result<&'a str, Error> {
        let n = self.u16()? as usize;
        Self::utf8(self.take(n)?)
    }

    /// `[long string]`: i32 length + UTF-8.
    pub fn long_string(&mut self) -> Result<&'a str, Error> {
        let n = usize::try_from(self.i32()?).map_err(|_| protocol_error("negative length"))?;
        Self::utf8(self.take(n)?)
    }

    /// `[short bytes]`: u16 length + bytes.
    pub fn short_bytes(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    /// `[bytes]`, `None` when the length is negative.
    fn bytes(&mut self) -> Result<Option<&'a [u8]>, Error> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(None);
        }
        self.take(n as usize).map(Some)
    }

    /// `[value]`: bytes, null (-1) or unset (-2).
    fn value(&mut self) -> Result<Value<'a>, Error> {
        match self.i32()? {
            -1 => Ok(Value::Null),
            -2 => Ok(Value::Unset),
            n if n < 0 => Err(protocol_error(format!("invalid value length {n}"))),
            n => self.take(n as usize).map(Value::Bytes),
        }
    }

    /// `[string map]`
    pub fn string_map(&mut self) -> Result<Vec<(&'a str, &'a str)>, Error> {
        let n = self.u16()?;
        (0..n)
            .map(|_| Ok((self.string()?, self.string()?)))
            .collect()
    }

    /// `[string list]`
    pub fn string_list(&mut self) -> Result<Vec<&'a str>, Error> {
        let n = self.u16()?;
        (0..n).map(|_| self.string()).collect()
    }

    /// Skips the custom payload (`[bytes map]`) of a request with that flag.
    pub fn skip_custom_payload(&mut self) -> Result<(), Error> {
        let n = self.u16()?;
        for _ in 0..n {
            self.string()?;
            self.bytes()?;
        }
        Ok(())
    }

    fn consistency(&mut self) -> Result<u16, Error> {
        let c = self.u16()?;
        if c > 0x000A {
            return Err(protocol_error(format!("unknown consistency level {c:#x}")));
        }
        Ok(c)
    }

    /// `<query_parameters>` of QUERY and EXECUTE (v4).
    pub fn query_options(&mut self) -> Result<Options<'a>, Error> {
        self.consistency()?;
        let flags = self.u8()?;
        let mut opts = Options::default();
        if flags & 0x01 != 0 {
            let n = self.u16()?;
            let with_names = flags & 0x40 != 0;
            let mut names = Vec::new();
            for _ in 0..n {
                if with_names {
                    names.push(self.string()?.to_owned());
                }
                opts.values.push(self.value()?);
            }
            if with_names {
                opts.names = Some(names);
            }
        }
        if flags & 0x04 != 0 {
            opts.page_size = Some(self.i32()?);
        }
        if flags & 0x08 != 0 {
            opts.paging_state = self.bytes()?;
        }
        if flags & 0x10 != 0 {
            self.consistency()?;
        }
        if flags & 0x20 != 0 {
            self.i64()?;
        }
        Ok(opts)
    }

    /// BATCH body; returns the statements (the batch type does not matter
    /// for a single in-memory node, except counters which are refused).
    pub fn batch(&mut self) -> Result<Vec<BatchItem<'a>>, Error> {
        let kind = self.u8()?;
        match kind {
            0 | 1 => {}
            2 => {
                return Err(Error::new(
                    DbError::Invalid,
                    "unsupported by cql-server: COUNTER batches",
                ))
            }
            k => return Err(protocol_error(format!("unknown batch type {k}"))),
        }
        let n = self.u16()?;
        let mut items = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let item_kind = self.u8()?;
            let target = match item_kind {
                0 => Ok(self.long_string()?),
                1 => Err(self.short_bytes()?),
                k => return Err(protocol_error(format!("unknown batch statement kind {k}"))),
            };
            let count = self.u16()?;
            let values = (0..count)
                .map(|_| self.value())
                .collect::<Result<Vec<_>, _>>()?;
            items.push(match target {
                Ok(cql) => BatchItem::Query(cql, values),
                Err(id) => BatchItem::Prepared(id, values),
            });
        }
        self.consistency()?;
        let flags = self.u8()?;
        if flags & 0x40 != 0 {
            return Err(protocol_error("named values in BATCH are not supported"));
        }
        if flags & 0x10 != 0 {
            self.consistency()?;
        }
        if flags & 0x20 != 0 {
            self.i64()?;
        }
        Ok(items)
    }
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    let s = truncate(s, u16::MAX as usize);
    buf.extend((s.len() as u16).to_be_bytes());
    buf.extend(s.as_bytes());
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_i32(buf: &mut Vec<u8>, v: i32) {
    buf.extend(v.to_be_bytes());
}

fn put_type(buf: &mut Vec<u8>, ty: &ColumnType) {
    use ColumnType as T;
    let id: u16 = match ty {
        T::Custom(name) => {
            buf.extend(0u16.to_be_bytes());
            put_string(buf, name);
            return;
        }
        T::Ascii => 0x01,
        T::BigInt => 0x02,
        T::Blob => 0x03,
        T::Boolean => 0x04,
        T::Counter => 0x05,
        T::Decimal => 0x06,
        T::Double => 0x07,
        T::Float => 0x08,
        T::Int => 0x09,
        T::Timestamp => 0x0B,
        T::Uuid => 0x0C,
        T::Text => 0x0D,
        T::Varint => 0x0E,
        T::Timeuuid => 0x0F,
        T::Inet => 0x10,
        T::Date => 0x11,
        T::Time => 0x12,
        T::SmallInt => 0x13,
        T::TinyInt => 0x14,
        T::Duration => 0x15,
        T::List(item) => {
            buf.extend(0x20u16.to_be_bytes());
            put_type(buf, item);
            return;
        }
        T::Map(k, v) => {
            buf.extend(0x21u16.to_be_bytes());
            put_type(buf, k);
            put_type(buf, v);
            return;
        }
        T::Set(item) => {
            buf.extend(0x22u16.to_be_bytes());
            put_type(buf, item);
            return;
        }
        T::UserDefinedType { .. } | T::Tuple(_) => {
            // Never created by cql-server; describe as an opaque blob.
            0x03
        }
    };
    buf.extend(id.to_be_bytes());
}

/// `<metadata>` with a global table spec.
fn put_metadata(
    buf: &mut Vec<u8>,
    keyspace: &str,
    table: &str,
    columns: &[(String, ColumnType)],
    paging_state: Option<&[u8]>,
) {
    if columns.is_empty() {
        // NO_METADATA
        put_i32(
            buf,
            0x0004 | if paging_state.is_some() { 0x0002 } else { 0 },
        );
        put_i32(buf, 0);
        if let Some(state) = paging_state {
            put_i32(buf, state.len() as i32);
            buf.extend(state);
        }
        return;
    }
    put_i32(
        buf,
        0x0001 | if paging_state.is_some() { 0x0002 } else { 0 },
    );
    put_i32(buf, columns.len() as i32);
    if let Some(state) = paging_state {
        put_i32(buf, state.len() as i32);
        buf.extend(state);
    }
    put_string(buf, keyspace);
    put_string(buf, table);
    for (name, ty) in columns {
        put_string(buf, name);
        put_type(buf, ty);
    }
}

fn put_rows(buf: &mut Vec<u8>, rows: RowSet) {
    put_i32(buf, 0x0002);
    put_metadata(
        buf,
        &rows.keyspace,
        &rows.table,
        &rows.columns,
        rows.paging_state.as_deref(),
    );
    put_i32(buf, rows.rows.len() as i32);
    for columns in rows.rows {
        // kassandra's value encoder.
        Row { columns }.serialize(buf);
    }
}

/// Body of a RESULT frame.
pub fn result_body(outcome: Outcome) -> Vec<u8> {
    let mut buf = Vec::new();
    match outcome {
        Outcome::Void => put_i32(&mut buf, 0x0001),
        Outcome::Rows(rows) => put_rows(&mut buf, rows),
        Outcome::SetKeyspace(ks) => {
            put_i32(&mut buf, 0x0003);
            put_string(&mut buf, &ks);
        }
        Outcome::Prepared(p) => {
            put_i32(&mut buf, 0x0004);
            buf.extend(16u16.to_be_bytes());
            buf.extend(p.id.to_be_bytes());
            // <prepared metadata>
            let (ks, table) = p.table.clone().unwrap_or_default();
            let global = p.table.is_some() && !p.vars.is_empty();
            put_i32(&mut buf, if global { 0x0001 } else { 0 });
            put_i32(&mut buf, p.vars.len() as i32);
            put_i32(&mut buf, p.pk_indexes.len() as i32);
            for i in &p.pk_indexes {
                buf.extend(i.to_be_bytes());
            }
            if global {
                put_string(&mut buf, &ks);
                put_string(&mut buf, &table);
            }
            for v in &p.vars {
                if !global {
                    // Unreachable: markers always belong to a table.
                    put_string(&mut buf, &ks);
                    put_string(&mut buf, &table);
                }
                put_string(&mut buf, &v.name);
                put_type(&mut buf, &v.ty);
            }
            // <result metadata>
            put_metadata(&mut buf, &ks, &table, &p.result_columns, None);
        }
        Outcome::SchemaChange {
            change,
            keyspace,
            table,
        } => {
            put_i32(&mut buf, 0x0005);
            put_string(&mut buf, change.as_str());
            match table {
                None => {
                    put_string(&mut buf, "KEYSPACE");
                    put_string(&mut buf, &keyspace);
                }
                Some(table) => {
                    put_string(&mut buf, "TABLE");
                    put_string(&mut buf, &keyspace);
                    put_string(&mut buf, &table);
                }
            }
        }
    }
    buf
}

/// Body of an ERROR frame.
pub fn error_body(err: &Error) -> Vec<u8> {
    let mut buf = Vec::new();
    let err = Error::new(err.error.clone(), truncate(&err.reason, 60_000));
    err.serialize(&mut buf);
    buf
}

/// Body of the SUPPORTED frame.
pub fn supported_body() -> Vec<u8> {
    let options: [(&str, &[&str]); 3] = [
        ("CQL_VERSION", &["3.4.5"]),
        ("COMPRESSION", &[]),
        ("PROTOCOL_VERSIONS", &["4/v4"]),
    ];
    let mut buf = Vec::new();
    buf.extend((options.len() as u16).to_be_bytes());
    for (key, values) in options {
        put_string(&mut buf, key);
        buf.extend((values.len() as u16).to_be_bytes());
        for v in values {
            put_string(&mut buf, v);
        }
    }
    buf
}

/// Appends a complete response frame to `out`.
pub fn put_frame(out: &mut Vec<u8>, stream: i16, opcode: u8, body: &[u8]) {
    out.push(RESPONSE_VERSION);
    out.push(0);
    out.extend(stream.to_be_bytes());
    out.push(opcode);
    out.extend((body.len() as u32).to_be_bytes());
    out.extend(body);
}

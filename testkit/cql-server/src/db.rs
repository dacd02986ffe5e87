//! Statement execution on top of kassandra's in-memory engine.
//!
//! kassandra provides the storage (`KvEngine<Memory>`), the schema catalog
//! with its `system` / `system_schema` tables and the value encoding of result
//! rows. Everything between the wire and the engine is done here, because
//! that is where kassandra's bugs were: bind-marker metadata, NULL handling,
//! clustering-key equality (it returned every row `>=` the key), restrictions
//! that were silently ignored, paging limits and panics on odd input.

use std::{
    cmp::Ordering,
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    ops::Bound,
    sync::Arc,
};

use kassandra::{
    cql::{
        engine::kv::KvEngine,
        schema::{keyspace::Strategy, Column, ColumnKind, ColumnType, PrimaryKey, TableSchema},
        value::{ClusteringKeyValue, CqlValue, PartitionKeyValue},
        Catalog, Engine,
    },
    error::DbError,
    frame::response::error::Error,
    storage::memory::Memory,
};
use uuid::Uuid;

use crate::{
    cql::{
        self, Lit, Op, ParseError, Parsed, Rhs, Selection, Selector, Statement, Term, TokenValue,
    },
    token::{partition_key_bytes, token_of_bytes, token_of_partition},
};

pub type Result<T, E = Error> = std::result::Result<T, E>;

type CkRange = (Bound<ClusteringKeyValue>, Bound<ClusteringKeyValue>);
type PkRange = (Bound<PartitionKeyValue>, Bound<PartitionKeyValue>);
const ALL_CK: CkRange = (Bound::Unbounded, Bound::Unbounded);
const ALL_PK: PkRange = (Bound::Unbounded, Bound::Unbounded);

/// Keyspaces that clients may read but never modify.
const SYSTEM_KEYSPACES: [&str; 2] = ["system", "system_schema"];

/// Fixed schema version: a single node always agrees with itself.
const SCHEMA_VERSION: Uuid = Uuid::from_u128(0x0b1c_3252_f787_4099_8594_1573_23b7_1789);

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(DbError::Invalid, msg.into())
}

fn protocol(msg: impl Into<String>) -> Error {
    Error::new(DbError::ProtocolError, msg.into())
}

impl From<ParseError> for Error {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Syntax(m) => Error::new(DbError::SyntaxError, m),
            ParseError::Unsupported(m) => invalid(format!("unsupported by cql-server: {m}")),
        }
    }
}

/// One bound value as it arrived on the wire.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Bytes(&'a [u8]),
    Null,
    Unset,
}

/// Per-request execution options.
#[derive(Debug, Default)]
pub struct Options<'a> {
    pub values: Vec<Value<'a>>,
    /// Present when the client sent `WITH_NAMES_FOR_VALUES`.
    pub names: Option<Vec<String>>,
    /// `None` or `<= 0`: no paging.
    pub page_size: Option<i32>,
    pub paging_state: Option<&'a [u8]>,
}

/// A bind marker described in PREPARED metadata.
#[derive(Debug, Clone)]
pub struct VarSpec {
    pub name: String,
    pub ty: ColumnType,
}

/// A `ROWS` result.
#[derive(Debug)]
pub struct RowSet {
    pub keyspace: String,
    pub table: String,
    pub columns: Vec<(String, ColumnType)>,
    pub rows: Vec<Vec<Option<CqlValue>>>,
    pub paging_state: Option<Vec<u8>>,
}

/// The outcome of a request, encoded as a RESULT frame by the caller.
#[derive(Debug)]
pub enum Outcome {
    Void,
    Rows(RowSet),
    SetKeyspace(String),
    SchemaChange {
        change: SchemaChange,
        keyspace: String,
        table: Option<String>,
    },
    Prepared(Arc<PreparedStatement>),
}

/// The change type of a `SCHEMA_CHANGE` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaChange {
    Created,
    Dropped,
}

impl SchemaChange {
    /// The `<change_type>` string of the protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaChange::Created => "CREATED",
            SchemaChange::Dropped => "DROPPED",
        }
    }
}

/// A statement after validation against the schema, ready to be executed
/// any number of times. Its keyspace is fixed at prepare time (like Cassandra).
#[derive(Debug)]
pub struct PreparedStatement {
    pub id: u128,
    statement: Statement,
    pub vars: Vec<VarSpec>,
    /// Indexes (into `vars`) of the partition key columns, in key order.
    pub pk_indexes: Vec<u16>,
    /// `(keyspace, table)` the statement works on, if any.
    pub table: Option<(String, String)>,
    /// Result columns of a SELECT (empty otherwise).
    pub result_columns: Vec<(String, ColumnType)>,
}

/// One statement of a BATCH request.
pub enum BatchItem<'a> {
    Query(&'a str, Vec<Value<'a>>),
    Prepared(&'a [u8], Vec<Value<'a>>),
}

/// The whole database: kassandra's engine plus the prepared statement cache.
pub struct Db {
    engine: KvEngine<Memory>,
    prepared: HashMap<u128, Arc<PreparedStatement>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("prepared", &self.prepared.len())
            .finish()
    }
}

/// A bound value after decoding.
#[derive(Debug, Clone, PartialEq)]
enum Bound_ {
    Val(CqlValue),
    Null,
    Unset,
}

/// A mutation computed from INSERT / UPDATE / DELETE, applied after all
/// statements of a batch were validated.
#[derive(Debug)]
enum Mutation {
    Upsert {
        ks: String,
        table: String,
        pk: PartitionKeyValue,
        ck: ClusteringKeyValue,
        values: Vec<(String, CqlValue)>,
        /// UPDATE that only sets nulls must not create a row.
        only_if_exists: bool,
    },
    /// `ck == Empty` removes the whole partition.
    Delete {
        ks: String,
        table: String,
        pk: PartitionKeyValue,
        ck: ClusteringKeyValue,
    },
    DeleteColumns {
        ks: String,
        table: String,
        pk: PartitionKeyValue,
        ck: ClusteringKeyValue,
        columns: Vec<String>,
    },
}

/// Opaque paging state handed to the client: where the next page starts.
#[derive(Debug, Clone)]
struct PageState {
    /// Index into the partition list of a partition-restricted read.
    part_idx: usize,
    /// Partition to resume a full scan from (inclusive).
    scan_pk: Option<PartitionKeyValue>,
    /// First clustering key of the next page inside that partition.
    ck: ClusteringKeyValue,
    /// Rows left under LIMIT.
    remaining: Option<u64>,
}

impl PageState {
    fn encode(&self) -> Vec<u8> {
        let tuple = (self.part_idx, &self.scan_pk, &self.ck, self.remaining);
        // Serialising plain data into JSON cannot fail.
        let mut out = b"cqls1".to_vec();
        out.extend(serde_json::to_vec(&tuple).unwrap_or_default());
        out
    }

    fn decode(data: &[u8]) -> Result<PageState> {
        let json = data
            .strip_prefix(b"cqls1")
            .ok_or_else(|| protocol("invalid paging state"))?;
        let (part_idx, scan_pk, ck, remaining) = serde_json::from_slice::<(
            usize,
            Option<PartitionKeyValue>,
            ClusteringKeyValue,
            Option<u64>,
        )>(json)
        .map_err(|_| protocol("invalid paging state"))?;
        Ok(PageState {
            part_idx,
            scan_pk,
            ck,
            remaining,
        })
    }
}

impl Db {
    /// A fresh database whose `system.local` advertises `ip` as the node's address.
    pub fn new(ip: IpAddr, port: u16) -> Db {
        let mut db = Db {
            engine: KvEngine::default(),
            prepared: HashMap::new(),
        };
        let host_id = Uuid::from_u128(0x5e1f_0000_0000_4000_8000_0000_0000_0000 | port as u128);
        let local = vec![
            ("key", CqlValue::Text("local".into())),
            ("bootstrapped", CqlValue::Text("COMPLETED".into())),
            ("broadcast_address", CqlValue::Inet(ip)),
            ("cluster_name", CqlValue::Text("cql-server".into())),
            ("cql_version", CqlValue::Text("3.4.5".into())),
            ("data_center", CqlValue::Text("datacenter1".into())),
            ("gossip_generation", CqlValue::Int(1)),
            ("host_id", CqlValue::Uuid(host_id)),
            ("listen_address", CqlValue::Inet(ip)),
            ("native_protocol_version", CqlValue::Text("4".into())),
            (
                "partitioner",
                CqlValue::Text("org.apache.cassandra.dht.Murmur3Partitioner".into()),
            ),
            ("rack", CqlValue::Text("rack1".into())),
            ("release_version", CqlValue::Text("3.0.8".into())),
            ("rpc_address", CqlValue::Inet(ip)),
            ("rpc_port", CqlValue::Int(port as i32)),
            ("schema_version", CqlValue::Uuid(SCHEMA_VERSION)),
            ("tokens", CqlValue::Set(vec![CqlValue::Text("0".into())])),
        ];
        let values = local.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        // Writing into the freshly created in-memory tables cannot fail.
        let _ = db.engine.insert(
            "system",
            "local",
            PartitionKeyValue::Simple(CqlValue::Text("local".into())),
            ClusteringKeyValue::Empty,
            values,
        );
        for ks in SYSTEM_KEYSPACES {
            db.fix_schema_column_types(ks);
        }
        db
    }

    /// kassandra writes some `system_schema.columns.type` strings wrongly
    /// (`bool`, `timyint`); the driver then fails to parse that keyspace's
    /// metadata. Rewrite them for every table of `keyspace`.
    fn fix_schema_column_types(&mut self, keyspace: &str) {
        let pk = PartitionKeyValue::Simple(CqlValue::Text(keyspace.to_owned()));
        let rows: Vec<(ClusteringKeyValue, String, String)> =
            match self.engine.read("system_schema", "columns", &pk, ALL_CK) {
                Ok(iter) => iter
                    .filter_map(|e| {
                        let table = text_of(e.row.get("table_name")?)?;
                        let column = text_of(e.row.get("column_name")?)?;
                        Some((e.clustering, table, column))
                    })
                    .collect(),
                Err(_) => return,
            };
        for (ck, table, column) in rows {
            let Some(ty) = self
                .engine
                .get_table(keyspace, &table)
                .and_then(|s| s.columns.get(&column))
                .map(|c| type_name(&c.ty))
            else {
                continue;
            };
            let _ = self.engine.insert(
                "system_schema",
                "columns",
                pk.clone(),
                ck,
                vec![("type".to_owned(), CqlValue::Text(ty))],
            );
        }
    }

    /// QUERY request.
    pub fn query(
        &mut self,
        keyspace: &mut Option<String>,
        cql: &str,
        opts: &Options<'_>,
    ) -> Result<Outcome> {
        let parsed = cql::parse(cql)?;
        let prepared = self.analyze(parsed, keyspace.as_deref(), 0)?;
        self.run(&prepared, keyspace, opts)
    }

    /// PREPARE request.
    pub fn prepare(&mut self, keyspace: Option<&str>, cql: &str) -> Result<Outcome> {
        let id = fnv128(keyspace.unwrap_or(""), cql);
        if let Some(p) = self.prepared.get(&id) {
            return Ok(Outcome::Prepared(p.clone()));
        }
        let parsed = cql::parse(cql)?;
        let prepared = Arc::new(self.analyze(parsed, keyspace, id)?);
        self.prepared.insert(id, prepared.clone());
        Ok(Outcome::Prepared(prepared))
    }

    /// EXECUTE request.
    pub fn execute(
        &mut self,
        keyspace: &mut Option<String>,
        id: &[u8],
        opts: &Options<'_>,
    ) -> Result<Outcome> {
        let prepared = self.lookup(id)?;
        self.run(&prepared, keyspace, opts)
    }

    /// BATCH request: all statements are validated first, then applied while
    /// holding the database lock, so a batch is atomic and isolated.
    pub fn batch(&mut self, keyspace: Option<&str>, items: Vec<BatchItem<'_>>) -> Result<Outcome> {
        let mut mutations = Vec::new();
        for item in items {
            let (prepared, values) = match item {
                BatchItem::Query(cql, values) => {
                    let parsed = cql::parse(cql)?;
                    (Arc::new(self.analyze(parsed, keyspace, 0)?), values)
                }
                BatchItem::Prepared(id, values) => (self.lookup(id)?, values),
            };
            let opts = Options {
                values,
                ..Options::default()
            };
            let values = self.values_in_marker_order(&prepared, &opts)?;
            match &prepared.statement {
                Statement::Insert(i) if !i.if_not_exists => {}
                Statement::Update(u) if !u.if_exists => {}
                Statement::Delete(d) if !d.if_exists => {}
                _ => {
                    return Err(invalid(
                        "only unconditional INSERT, UPDATE and DELETE are allowed in a batch",
                    ))
                }
            }
            mutations.extend(self.mutations(&prepared.statement, &values)?);
        }
        for m in mutations {
            self.apply(m)?;
        }
        Ok(Outcome::Void)
    }

    fn lookup(&self, id: &[u8]) -> Result<Arc<PreparedStatement>> {
        let unprepared = || {
            Error::new(
                DbError::Unprepared {
                    statement_id: bytes::Bytes::copy_from_slice(id),
                },
                "Prepared statement not found (the server may have been restarted)",
            )
        };
        let key: [u8; 16] = id.try_into().map_err(|_| unprepared())?;
        self.prepared
            .get(&u128::from_be_bytes(key))
            .cloned()
            .ok_or_else(unprepared)
    }

    fn schema(&self, ks: &str, table: &str) -> Result<&TableSchema> {
        self.engine
            .get_table(ks, table)
            .ok_or_else(|| invalid(format!("unconfigured table {ks}.{table}")))
    }

    fn keyspace_exists(&mut self, ks: &str) -> bool {
        let pk = PartitionKeyValue::Simple(CqlValue::Text(ks.to_owned()));
        self.engine
            .read("system_schema", "keyspaces", &pk, ALL_CK)
            .map(|mut it| it.next().is_some())
            .unwrap_or(false)
    }

    /// Resolves the keyspace, checks tables / columns and describes the markers.
    fn analyze(
        &mut self,
        parsed: Parsed,
        keyspace: Option<&str>,
        id: u128,
    ) -> Result<PreparedStatement> {
        let Parsed {
            mut statement,
            markers,
        } = parsed;
        let resolve = |t: &mut cql::TableName| -> Result<(String, String)> {
            let ks = match (&t.keyspace, keyspace) {
                (Some(ks), _) => ks.clone(),
                (None, Some(ks)) => ks.to_owned(),
                (None, None) => {
                    return Err(invalid(
                        "No keyspace has been specified. USE a keyspace, or explicitly \
                         specify keyspace.tablename",
                    ))
                }
            };
            t.keyspace = Some(ks.clone());
            Ok((ks, t.name.clone()))
        };
        let mut vars: Vec<Option<VarSpec>> = vec![None; markers.len()];
        let mut table = None;
        let mut result_columns = Vec::new();
        let mut pk_binds: HashMap<String, usize> = HashMap::new();

        match &mut statement {
            Statement::Use(_) | Statement::CreateKeyspace(_) => {}
            Statement::CreateTable(ct) => {
                resolve(&mut ct.table)?;
            }
            Statement::Truncate(t) => {
                let (ks, name) = resolve(t)?;
                self.schema(&ks, &name)?;
                check_writable(&ks)?;
            }
            Statement::DropTable(dt) => {
                // Whether the table exists is checked when it runs (IF EXISTS).
                let (ks, _) = resolve(&mut dt.table)?;
                check_writable(&ks)?;
            }
            Statement::Insert(ins) => {
                let (ks, name) = resolve(&mut ins.table)?;
                check_writable(&ks)?;
                let schema = self.schema(&ks, &name)?;
                if ins.columns.len() != ins.values.len() {
                    return Err(invalid("unmatched column names/values"));
                }
                let mut seen = BTreeSet::new();
                for (col, term) in ins.columns.iter().zip(&ins.values) {
                    let ty = column_type(schema, col)?;
                    if !seen.insert(col.clone()) {
                        return Err(invalid(format!("multiple definitions for column {col}")));
                    }
                    if let Term::Bind(m) = term {
                        vars[*m] = Some(var(col, ty));
                        pk_binds.insert(col.clone(), *m);
                    }
                }
                for key in schema
                    .partition_key
                    .into_iter()
                    .chain(&schema.clustering_key)
                {
                    if !seen.contains(key) {
                        return Err(invalid(format!(
                            "Some primary key parts are missing: {key}"
                        )));
                    }
                }
                table = Some((ks, name));
            }
            Statement::Update(up) => {
                let (ks, name) = resolve(&mut up.table)?;
                check_writable(&ks)?;
                let schema = self.schema(&ks, &name)?;
                for (col, term) in &up.sets {
                    let ty = column_type(schema, col)?;
                    if is_key(schema, col) {
                        return Err(invalid(format!("PRIMARY KEY part {col} found in SET part")));
                    }
                    if let Term::Bind(m) = term {
                        vars[*m] = Some(var(col, ty));
                    }
                }
                describe_relations(schema, &up.relations, &mut vars, &mut pk_binds)?;
                table = Some((ks, name));
            }
            Statement::Delete(del) => {
                let (ks, name) = resolve(&mut del.table)?;
                check_writable(&ks)?;
                let schema = self.schema(&ks, &name)?;
                for col in &del.columns {
                    column_type(schema, col)?;
                    if is_key(schema, col) {
                        return Err(invalid(format!("Invalid identifier {col} for deletion (should not be a PRIMARY KEY part)")));
                    }
                }
                describe_relations(schema, &del.relations, &mut vars, &mut pk_binds)?;
                table = Some((ks, name));
            }
            Statement::Select(sel) => {
                let (ks, name) = resolve(&mut sel.table)?;
                let schema = self.schema(&ks, &name)?;
                describe_relations(schema, &sel.relations, &mut vars, &mut pk_binds)?;
                describe_token_relations(schema, sel, &mut vars)?;
                check_restrictions(schema, &sel.relations, sel.allow_filtering)?;
                if let Some(Term::Bind(m)) = &sel.limit {
                    vars[*m] = Some(var("[limit]", &ColumnType::Int));
                }
                for (col, desc) in &sel.order_by {
                    if !schema.clustering_key.into_iter().any(|c| c == col) {
                        return Err(invalid(format!(
                            "Order by is currently only supported on the clustered columns, got {col}"
                        )));
                    }
                    if *desc {
                        return Err(invalid("unsupported by cql-server: ORDER BY ... DESC"));
                    }
                }
                result_columns = select_columns(schema, &sel.selection)?;
                if sel.distinct {
                    for out in select_outputs(schema, &sel.selection) {
                        let Output::Column(col) = out else { continue };
                        if !schema.partition_key.into_iter().any(|c| c == &col) {
                            return Err(invalid(
                                "SELECT DISTINCT queries must only request partition key columns",
                            ));
                        }
                    }
                }
                table = Some((ks, name));
            }
        }

        let vars = vars
            .into_iter()
            .zip(markers)
            .enumerate()
            .map(|(i, (v, marker))| {
                let mut v = v.ok_or_else(|| {
                    invalid(format!("bind marker {i} is in an unsupported position"))
                })?;
                // A named marker is described (and bound) by its own name.
                if let Some(name) = marker {
                    v.name = name;
                }
                Ok(v)
            })
            .collect::<Result<Vec<_>>>()?;
        let pk_indexes = match &table {
            Some((ks, name)) => {
                let schema = self.schema(ks, name)?;
                schema
                    .partition_key
                    .into_iter()
                    .map(|k| pk_binds.get(k).map(|&m| m as u16))
                    .collect::<Option<Vec<u16>>>()
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        Ok(PreparedStatement {
            id,
            statement,
            vars,
            pk_indexes,
            table,
            result_columns,
        })
    }

    /// Values ordered like the markers (resolving `WITH_NAMES_FOR_VALUES`).
    fn values_in_marker_order<'v>(
        &self,
        p: &PreparedStatement,
        opts: &Options<'v>,
    ) -> Result<Vec<Value<'v>>> {
        let values = match &opts.names {
            None => opts.values.clone(),
            Some(names) => p
                .vars
                .iter()
                .map(|v| {
                    names
                        .iter()
                        .position(|n| n.eq_ignore_ascii_case(&v.name))
                        .and_then(|i| opts.values.get(i).copied())
                        .ok_or_else(|| invalid(format!("No value for bind variable {}", v.name)))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        if values.len() != p.vars.len() {
            return Err(invalid(format!(
                "There were {} markers(?) in CQL but {} bound variables",
                p.vars.len(),
                values.len()
            )));
        }
        Ok(values)
    }

    fn run(
        &mut self,
        p: &PreparedStatement,
        keyspace: &mut Option<String>,
        opts: &Options<'_>,
    ) -> Result<Outcome> {
        let values = self.values_in_marker_order(p, opts)?;
        match &p.statement {
            Statement::Use(ks) => {
                if !self.keyspace_exists(ks) {
                    return Err(invalid(format!("Keyspace '{ks}' does not exist")));
                }
                *keyspace = Some(ks.clone());
                Ok(Outcome::SetKeyspace(ks.clone()))
            }
            Statement::CreateKeyspace(ck) => self.create_keyspace(ck),
            Statement::CreateTable(ct) => self.create_table(ct),
            Statement::DropTable(dt) => self.drop_table(dt),
            Statement::Truncate(t) => {
                let (ks, name) = table_of(t);
                self.schema(ks, name)?;
                let partitions: BTreeSet<PartitionKeyValue> = self
                    .engine
                    .scan(ks, name, ALL_PK)?
                    .map(|e| e.partition)
                    .collect();
                for pk in partitions {
                    let _ = self.engine.delete(ks, name, pk, ClusteringKeyValue::Empty);
                }
                Ok(Outcome::Void)
            }
            Statement::Select(sel) => self.select(p, sel, &values, opts),
            Statement::Insert(ins) if ins.if_not_exists => {
                let mutations = self.mutations(&p.statement, &values)?;
                let (ks, name) = table_of(&ins.table);
                let Some(Mutation::Upsert { pk, ck, .. }) = mutations.first() else {
                    return Err(invalid("INSERT ... IF NOT EXISTS produced no row"));
                };
                let existing = self.read_row(ks, name, pk, ck)?;
                if let Some(row) = existing {
                    let schema = self.schema(ks, name)?;
                    let mut columns = vec![("[applied]".to_owned(), ColumnType::Boolean)];
                    let mut values = vec![Some(CqlValue::Boolean(false))];
                    for (col, ty) in select_columns(schema, &Selection::All)? {
                        values.push(row.get(&col).cloned().and_then(non_empty));
                        columns.push((col, ty));
                    }
                    return Ok(applied_rows(ks, name, columns, values));
                }
                for m in mutations {
                    self.apply(m)?;
                }
                Ok(applied(ks, name, true))
            }
            Statement::Update(cql::Update {
                table,
                relations,
                if_exists: true,
                ..
            })
            | Statement::Delete(cql::Delete {
                table,
                relations,
                if_exists: true,
                ..
            }) => {
                let (ks, name) = table_of(table);
                let schema = self.schema(ks, name)?.clone();
                let whole_partition =
                    matches!(&p.statement, Statement::Delete(d) if d.columns.is_empty());
                let keys = key_values(&schema, relations, &values, !whole_partition)?;
                if keys.len() != 1 {
                    return Err(invalid("IN is not allowed with IF EXISTS"));
                }
                let (pk, ck) = keys.into_iter().next().ok_or_else(|| invalid("no key"))?;
                if self.read_row(ks, name, &pk, &ck)?.is_none() {
                    return Ok(applied(ks, name, false));
                }
                for m in self.mutations(&p.statement, &values)? {
                    self.apply(m)?;
                }
                Ok(applied(ks, name, true))
            }
            Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) => {
                for m in self.mutations(&p.statement, &values)? {
                    self.apply(m)?;
                }
                Ok(Outcome::Void)
            }
        }
    }

    fn create_keyspace(&mut self, ck: &cql::CreateKeyspace) -> Result<Outcome> {
        if SYSTEM_KEYSPACES.contains(&ck.name.as_str()) {
            return Err(Error::new(
                DbError::Unauthorized,
                "system keyspaces are read-only",
            ));
        }
        let get = |key: &str| {
            ck.replication
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let rf = |lit: Option<Lit>| -> Result<usize> {
            match lit {
                Some(Lit::Str(s)) | Some(Lit::Int(s)) => s
                    .parse()
                    .map_err(|_| Error::new(DbError::ConfigError, "invalid replication_factor")),
                _ => Err(Error::new(
                    DbError::ConfigError,
                    "missing replication_factor",
                )),
            }
        };
        let class = match get("class") {
            Some(Lit::Str(c)) => c,
            _ => {
                return Err(Error::new(
                    DbError::ConfigError,
                    "Missing replication strategy class",
                ))
            }
        };
        let strategy = match class.rsplit('.').next().unwrap_or("") {
            "SimpleStrategy" => Strategy::SimpleStrategy {
                replication_factor: rf(get("replication_factor"))?,
            },
            "NetworkTopologyStrategy" => {
                let mut datacenter_repfactors = HashMap::new();
                for (k, v) in &ck.replication {
                    if k != "class" {
                        datacenter_repfactors.insert(k.clone(), rf(Some(v.clone()))?);
                    }
                }
                Strategy::NetworkTopologyStrategy {
                    datacenter_repfactors,
                }
            }
            _ => Strategy::LocalStrategy,
        };
        match self
            .engine
            .create_keyspace(ck.name.clone(), false, strategy)
        {
            Ok(_) => Ok(Outcome::SchemaChange {
                change: SchemaChange::Created,
                keyspace: ck.name.clone(),
                table: None,
            }),
            Err(DbError::AlreadyExists { .. }) if ck.if_not_exists => Ok(Outcome::Void),
            Err(DbError::AlreadyExists { .. }) => Err(Error::new(
                DbError::AlreadyExists {
                    keyspace: ck.name.clone(),
                    table: String::new(),
                },
                format!("Keyspace {} already exists", ck.name),
            )),
            Err(e) => Err(Error::from(e)),
        }
    }

    fn create_table(&mut self, ct: &cql::CreateTable) -> Result<Outcome> {
        let (ks, name) = table_of(&ct.table);
        check_writable(ks)?;
        let mut seen = BTreeSet::new();
        for (col, _) in &ct.columns {
            if !seen.insert(col.as_str()) {
                return Err(invalid(format!("Multiple definition of identifier {col}")));
            }
        }
        let mut keys = BTreeSet::new();
        for key in ct.partition_key.iter().chain(&ct.clustering_key) {
            if !keys.insert(key.as_str()) {
                return Err(invalid(format!("duplicate PRIMARY KEY column {key}")));
            }
            let Some((_, ty)) = ct.columns.iter().find(|(c, _)| c == key) else {
                return Err(invalid(format!(
                    "Unknown definition {key} referenced in PRIMARY KEY"
                )));
            };
            if matches!(
                ty,
                ColumnType::List(_) | ColumnType::Set(_) | ColumnType::Map(..)
            ) {
                return Err(invalid(format!(
                    "unsupported by cql-server: collection type for PRIMARY KEY column {key}"
                )));
            }
        }
        let columns = ct
            .columns
            .iter()
            .map(|(col, ty)| {
                let kind = if ct.partition_key.contains(col) {
                    ColumnKind::PartitionKey
                } else if ct.clustering_key.contains(col) {
                    ColumnKind::Clustering
                } else {
                    ColumnKind::Regular
                };
                (
                    col.clone(),
                    Column {
                        ty: ty.clone(),
                        kind,
                    },
                )
            })
            .collect();
        let schema = TableSchema {
            columns,
            partition_key: PrimaryKey::from_definition(ct.partition_key.clone()),
            clustering_key: PrimaryKey::from_definition(ct.clustering_key.clone()),
            partitioner: None,
        };
        if !self.keyspace_exists(ks) {
            return Err(invalid(format!("Keyspace '{ks}' does not exist")));
        }
        match self
            .engine
            .create_table(ks.to_owned(), name.to_owned(), false, schema, Vec::new())
        {
            Ok(_) => {
                self.fix_schema_column_types(ks);
                Ok(Outcome::SchemaChange {
                    change: SchemaChange::Created,
                    keyspace: ks.to_owned(),
                    table: Some(name.to_owned()),
                })
            }
            Err(DbError::AlreadyExists { .. }) if ct.if_not_exists => Ok(Outcome::Void),
            Err(DbError::AlreadyExists { .. }) => Err(Error::new(
                DbError::AlreadyExists {
                    keyspace: ks.to_owned(),
                    table: name.to_owned(),
                },
                format!("Table {ks}.{name} already exists"),
            )),
            Err(e) => Err(Error::from(e)),
        }
    }

    /// `DROP TABLE`: removes the table's rows, its `system_schema.tables` /
    /// `system_schema.columns` rows, its catalog entry and every prepared
    /// statement that uses it (executing one then gets `Unprepared`, and the
    /// driver's re-prepare fails with "unconfigured table", as in Cassandra).
    fn drop_table(&mut self, dt: &cql::DropTable) -> Result<Outcome> {
        let (ks, name) = table_of(&dt.table);
        check_writable(ks)?;
        if dt.if_exists && self.engine.get_table(ks, name).is_none() {
            return Ok(Outcome::Void);
        }
        // "unconfigured table ks.t", like any statement on a missing table.
        self.schema(ks, name)?;
        // kassandra's catalog cannot forget a table: build a fresh one without
        // it first (the only step that can fail), then move the rows over.
        let mut engine = self.catalog_without(ks, name)?;
        let partitions: BTreeSet<PartitionKeyValue> = self
            .engine
            .scan(ks, name, ALL_PK)?
            .map(|e| e.partition)
            .collect();
        for pk in partitions {
            let _ = self.engine.delete(ks, name, pk, ClusteringKeyValue::Empty);
        }
        let schema_pk = PartitionKeyValue::Simple(CqlValue::Text(ks.to_owned()));
        for schema_table in ["tables", "columns"] {
            let rows: Vec<ClusteringKeyValue> = self
                .engine
                .read("system_schema", schema_table, &schema_pk, ALL_CK)?
                .filter(|e| e.row.get("table_name").and_then(text_of).as_deref() == Some(name))
                .map(|e| e.clustering)
                .collect();
            for ck in rows {
                let _ = self
                    .engine
                    .delete("system_schema", schema_table, schema_pk.clone(), ck);
            }
        }
        engine.data = std::mem::take(&mut self.engine.data);
        self.engine = engine;
        self.prepared
            .retain(|_, p| statement_table(&p.statement) != Some((ks, name)));
        Ok(Outcome::SchemaChange {
            change: SchemaChange::Dropped,
            keyspace: ks.to_owned(),
            table: Some(name.to_owned()),
        })
    }

    /// A new engine whose catalog has every keyspace and table of the current
    /// one except `ks.table`, and no data. kassandra exposes neither a way to
    /// drop a table nor the keyspace list, so the keyspaces and their
    /// replication strategies are read from its serialised catalog; the table
    /// schemas are cloned (that keeps their column order).
    fn catalog_without(&mut self, ks: &str, table: &str) -> Result<KvEngine<Memory>> {
        let server_error = |what: &str| {
            Error::new(
                DbError::ServerError,
                format!("cql-server could not drop {ks}.{table}: {what}"),
            )
        };
        let data = std::mem::take(&mut self.engine.data);
        let catalog = serde_json::to_value(&self.engine);
        self.engine.data = data;
        let catalog = catalog.map_err(|e| server_error(&e.to_string()))?;
        let keyspaces = catalog
            .get("schema")
            .and_then(|s| s.get("schema"))
            .and_then(|s| s.as_object())
            .ok_or_else(|| server_error("unexpected catalog layout"))?;
        let mut engine = KvEngine::<Memory>::default();
        for (ks_name, keyspace) in keyspaces {
            if SYSTEM_KEYSPACES.contains(&ks_name.as_str()) {
                // Part of every fresh engine.
                continue;
            }
            let strategy: Strategy = keyspace
                .get("strategy")
                .cloned()
                .ok_or_else(|| server_error("keyspace without strategy"))
                .and_then(|s| {
                    serde_json::from_value(s).map_err(|e| server_error(&e.to_string()))
                })?;
            engine
                .create_keyspace(ks_name.clone(), false, strategy)
                .map_err(|e| server_error(&format!("{e:?}")))?;
            let tables = keyspace
                .get("tables")
                .and_then(|t| t.as_object())
                .ok_or_else(|| server_error("keyspace without tables"))?;
            for table_name in tables.keys() {
                if ks_name == ks && table_name == table {
                    continue;
                }
                let schema = self
                    .engine
                    .get_table(ks_name, table_name)
                    .cloned()
                    .ok_or_else(|| server_error("table missing from the catalog"))?;
                engine
                    .create_table(
                        ks_name.clone(),
                        table_name.clone(),
                        false,
                        schema,
                        Vec::new(),
                    )
                    .map_err(|e| server_error(&format!("{e:?}")))?;
            }
        }
        Ok(engine)
    }

    fn read_row(
        &mut self,
        ks: &str,
        table: &str,
        pk: &PartitionKeyValue,
        ck: &ClusteringKeyValue,
    ) -> Result<Option<std::collections::BTreeMap<String, CqlValue>>> {
        // An empty clustering key addresses the whole partition.
        let range = match ck {
            ClusteringKeyValue::Empty => ALL_CK,
            ck => (Bound::Included(ck.clone()), Bound::Included(ck.clone())),
        };
        let mut iter = self.engine.read(ks, table, pk, range)?;
        Ok(iter.next().map(|e| e.row))
    }

    fn apply(&mut self, m: Mutation) -> Result<()> {
        match m {
            Mutation::Upsert {
                ks,
                table,
                pk,
                ck,
                values,
                only_if_exists,
            } => {
                if only_if_exists && self.read_row(&ks, &table, &pk, &ck)?.is_none() {
                    return Ok(());
                }
                self.engine.insert(&ks, &table, pk, ck, values)
            }
            Mutation::Delete { ks, table, pk, ck } => {
                // kassandra errors if the table was never touched: nothing to delete then.
                let _ = self.engine.delete(&ks, &table, pk, ck);
                Ok(())
            }
            Mutation::DeleteColumns {
                ks,
                table,
                pk,
                ck,
                columns,
            } => {
                if self.read_row(&ks, &table, &pk, &ck)?.is_none() {
                    return Ok(());
                }
                let values = columns.into_iter().map(|c| (c, CqlValue::Empty)).collect();
                self.engine.insert(&ks, &table, pk, ck, values)
            }
        }
    }

    fn mutations(&self, statement: &Statement, values: &[Value<'_>]) -> Result<Vec<Mutation>> {
        match statement {
            Statement::Insert(ins) => {
                let (ks, name) = table_of(&ins.table);
                let schema = self.schema(ks, name)?;
                let mut row = HashMap::new();
                let mut out = Vec::new();
                for (col, term) in ins.columns.iter().zip(&ins.values) {
                    let ty = column_type(schema, col)?;
                    match bind(term, ty, values)? {
                        Bound_::Val(v) => {
                            row.insert(col.clone(), v.clone());
                            out.push((col.clone(), v));
                        }
                        Bound_::Null if is_key(schema, col) => {
                            return Err(invalid(format!(
                                "Invalid null value in condition for column {col}"
                            )))
                        }
                        Bound_::Null => out.push((col.clone(), CqlValue::Empty)),
                        Bound_::Unset if is_key(schema, col) => {
                            return Err(invalid(format!("Invalid unset value for column {col}")))
                        }
                        Bound_::Unset => {}
                    }
                }
                let pk = partition_key(schema, &row)?;
                let ck = clustering_key(schema, &row)?;
                Ok(vec![Mutation::Upsert {
                    ks: ks.to_owned(),
                    table: name.to_owned(),
                    pk,
                    ck,
                    values: out,
                    only_if_exists: false,
                }])
            }
            Statement::Update(up) => {
                let (ks, name) = table_of(&up.table);
                let schema = self.schema(ks, name)?;
                let mut sets = Vec::new();
                for (col, term) in &up.sets {
                    let ty = column_type(schema, col)?;
                    match bind(term, ty, values)? {
                        Bound_::Val(v) => sets.push((col.clone(), v)),
                        Bound_::Null => sets.push((col.clone(), CqlValue::Empty)),
                        Bound_::Unset => {}
                    }
                }
                let only_nulls = sets.iter().all(|(_, v)| *v == CqlValue::Empty);
                let mut out = Vec::new();
                for (pk, ck) in key_values(schema, &up.relations, values, true)? {
                    let mut row = sets.clone();
                    row.extend(key_columns(schema, &pk, &ck));
                    out.push(Mutation::Upsert {
                        ks: ks.to_owned(),
                        table: name.to_owned(),
                        pk,
                        ck,
                        values: row,
                        only_if_exists: only_nulls,
                    });
                }
                Ok(out)
            }
            Statement::Delete(del) => {
                let (ks, name) = table_of(&del.table);
                let schema = self.schema(ks, name)?;
                let whole_partition = del.columns.is_empty();
                let keys = key_values(schema, &del.relations, values, !whole_partition)?;
                Ok(keys
                    .into_iter()
                    .map(|(pk, ck)| {
                        if whole_partition {
                            Mutation::Delete {
                                ks: ks.to_owned(),
                                table: name.to_owned(),
                                pk,
                                ck,
                            }
                        } else {
                            Mutation::DeleteColumns {
                                ks: ks.to_owned(),
                                table: name.to_owned(),
                                pk,
                                ck,
                                columns: del.columns.clone(),
                            }
                        }
                    })
                    .collect())
            }
            _ => Err(invalid("not a modification statement")),
        }
    }

    fn select(
        &mut self,
        p: &PreparedStatement,
        sel: &cql::Select,
        values: &[Value<'_>],
        opts: &Options<'_>,
    ) -> Result<Outcome> {
        let (ks, name) = table_of(&sel.table);
        let schema = self.schema(ks, name)?.clone();
        let pk_cols: Vec<String> = schema.partition_key.into_iter().cloned().collect();
        let ck_cols: Vec<String> = schema.clustering_key.into_iter().cloned().collect();

        // Bind all restrictions.
        let mut restrictions: Vec<(String, Restriction)> = Vec::new();
        for rel in &sel.relations {
            let ty = column_type(&schema, &rel.column)?;
            let r = match &rel.rhs {
                Rhs::Cmp(op, term) => {
                    Restriction::Cmp(*op, bind_non_null(term, ty, values, &rel.column)?)
                }
                Rhs::In(terms) => Restriction::In(
                    terms
                        .iter()
                        .map(|t| bind_non_null(t, ty, values, &rel.column))
                        .collect::<Result<_>>()?,
                ),
                Rhs::InBind(m) => Restriction::In(bind_in_list(*m, ty, values, &rel.column)?),
            };
            restrictions.push((rel.column.clone(), r));
        }
        let token_bounds = bind_token_relations(&schema, &sel.token_relations, values)?;
        let mut limit = match &sel.limit {
            None => None,
            Some(term) => match bind(term, &ColumnType::Int, values)? {
                Bound_::Val(CqlValue::Int(n)) if n > 0 => Some(n as u64),
                _ => return Err(invalid("LIMIT must be strictly positive")),
            },
        };

        let pk_lookup = check_restrictions(&schema, &sel.relations, sel.allow_filtering)?;
        let partitions: Option<Vec<PartitionKeyValue>> = if pk_lookup {
            let mut per_column: Vec<Vec<CqlValue>> = Vec::new();
            for c in &pk_cols {
                let vals = restrictions
                    .iter()
                    .find(|(rc, _)| rc == c)
                    .map(|(_, r)| match r {
                        Restriction::Cmp(_, v) => vec![v.clone()],
                        Restriction::In(vs) => vs.clone(),
                    })
                    .unwrap_or_default();
                per_column.push(vals);
            }
            let mut out: Vec<PartitionKeyValue> = Vec::new();
            for combo in cartesian(&per_column) {
                let pk = make_partition_key(&schema, combo)?;
                if !out.contains(&pk) {
                    out.push(pk);
                }
            }
            Some(out)
        } else {
            None
        };

        // Narrow single-partition reads by the clustering equality prefix
        // (only for user tables; kassandra keys system tables differently).
        let ck_range = if partitions.is_some() && !SYSTEM_KEYSPACES.contains(&ks) {
            let mut prefix = Vec::new();
            for c in &ck_cols {
                match restrictions
                    .iter()
                    .find(|(rc, r)| rc == c && matches!(r, Restriction::Cmp(Op::Eq, _)))
                {
                    Some((_, Restriction::Cmp(_, v))) => prefix.push(v.clone()),
                    _ => break,
                }
            }
            clustering_range(&schema, prefix)
        } else {
            ALL_CK
        };

        let outputs = select_outputs(&schema, &sel.selection);
        let count_only = matches!(sel.selection, Selection::Count(_));
        let page_size = match opts.page_size {
            Some(n) if n > 0 && !count_only => n as usize,
            _ => usize::MAX,
        };
        let resume = match opts.paging_state {
            Some(state) if !count_only => Some(PageState::decode(state)?),
            _ => None,
        };
        if let Some(r) = &resume {
            limit = r.remaining.or(limit);
        }

        let matches = |row: &std::collections::BTreeMap<String, CqlValue>| {
            restrictions.iter().all(|(col, r)| {
                let Some(v) = row.get(col).filter(|v| **v != CqlValue::Empty) else {
                    return false;
                };
                match r {
                    Restriction::Cmp(op, want) => match compare(v, want) {
                        Some(ord) => op_holds(*op, ord),
                        None => false,
                    },
                    Restriction::In(list) => {
                        list.iter().any(|w| compare(v, w) == Some(Ordering::Equal))
                    }
                }
            })
        };

        let mut rows: Vec<Vec<Option<CqlValue>>> = Vec::new();
        let mut count: i64 = 0;
        let mut next_page: Option<PageState> = None;
        let mut last_partition: Option<PartitionKeyValue> = None;

        // Visits candidate rows in order; returns false to stop.
        let mut visit = |part_idx: usize,
                         pk: &PartitionKeyValue,
                         ck: &ClusteringKeyValue,
                         row: &std::collections::BTreeMap<String, CqlValue>|
         -> bool {
            if !matches(row) {
                return true;
            }
            if sel.distinct {
                if last_partition.as_ref() == Some(pk) {
                    return true;
                }
                last_partition = Some(pk.clone());
            }
            if limit == Some(0) {
                return false;
            }
            if rows.len() >= page_size {
                next_page = Some(PageState {
                    part_idx,
                    scan_pk: Some(pk.clone()),
                    ck: ck.clone(),
                    remaining: limit,
                });
                return false;
            }
            if let Some(l) = limit.as_mut() {
                *l -= 1;
            }
            if count_only {
                count += 1;
            } else {
                rows.push(
                    outputs
                        .iter()
                        .map(|out| match out {
                            Output::Column(c) => row.get(c).cloned().and_then(non_empty),
                            Output::Token => token_of_partition(pk).map(CqlValue::BigInt),
                        })
                        .collect(),
                );
            }
            true
        };

        match &partitions {
            Some(parts) => {
                let start = resume.as_ref().map(|r| r.part_idx).unwrap_or(0);
                'outer: for (idx, pk) in parts.iter().enumerate().skip(start) {
                    let iter = self.engine.read(ks, name, pk, ck_range.clone())?;
                    for e in iter {
                        if let Some(r) = &resume {
                            if idx == r.part_idx && e.clustering < r.ck {
                                continue;
                            }
                        }
                        if !visit(idx, pk, &e.clustering, &e.row) {
                            break 'outer;
                        }
                    }
                }
            }
            // Full scans of user tables (and any token-restricted scan) run in
            // token order, like ScyllaDB, so `token(k) > token(last)` pages.
            None if !token_bounds.is_empty() || !SYSTEM_KEYSPACES.contains(&ks) => {
                let resume_at = resume.as_ref().and_then(|r| {
                    let pk = r.scan_pk.clone()?;
                    Some((partition_token(&pk), pk, &r.ck))
                });
                let mut entries = Vec::new();
                let mut last: Option<(PartitionKeyValue, i64)> = None;
                for e in self.engine.scan(ks, name, ALL_PK)? {
                    let token = match &last {
                        Some((pk, t)) if *pk == e.partition => *t,
                        _ => {
                            let t = partition_token(&e.partition);
                            last = Some((e.partition.clone(), t));
                            t
                        }
                    };
                    if !token_bounds
                        .iter()
                        .all(|(op, bound)| op_holds(*op, token.cmp(bound)))
                    {
                        continue;
                    }
                    if let Some((rt, rpk, rck)) = &resume_at {
                        match (token, &e.partition).cmp(&(*rt, rpk)) {
                            Ordering::Less => continue,
                            Ordering::Equal if e.clustering < **rck => continue,
                            _ => {}
                        }
                    }
                    entries.push((token, e));
                }
                // Stable: rows of one partition stay in clustering order.
                entries.sort_by(|(ta, a), (tb, b)| (ta, &a.partition).cmp(&(tb, &b.partition)));
                for (_, e) in entries {
                    if !visit(0, &e.partition, &e.clustering, &e.row) {
                        break;
                    }
                }
            }
            None => {
                let range: PkRange = match resume.as_ref().and_then(|r| r.scan_pk.clone()) {
                    Some(pk) => (Bound::Included(pk), Bound::Unbounded),
                    None => ALL_PK,
                };
                let iter = self.engine.scan(ks, name, range)?;
                for e in iter {
                    if let Some(r) = &resume {
                        if Some(&e.partition) == r.scan_pk.as_ref() && e.clustering < r.ck {
                            continue;
                        }
                    }
                    if !visit(0, &e.partition, &e.clustering, &e.row) {
                        break;
                    }
                }
            }
        }

        if count_only {
            rows.push(vec![Some(CqlValue::BigInt(count))]);
        }
        Ok(Outcome::Rows(RowSet {
            keyspace: ks.to_owned(),
            table: name.to_owned(),
            columns: p.result_columns.clone(),
            rows,
            paging_state: next_page.map(|s| s.encode()),
        }))
    }
}

/// Validates the shape of a SELECT's WHERE clause like Cassandra does and
/// returns whether it addresses whole partitions by key (`=` / `IN` on every
/// partition key column) rather than scanning the table.
fn check_restrictions(
    schema: &TableSchema,
    relations: &[cql::Relation],
    allow_filtering: bool,
) -> Result<bool> {
    let pk_cols: Vec<&String> = schema.partition_key.into_iter().collect();
    let ck_cols: Vec<&String> = schema.clustering_key.into_iter().collect();
    fn on<'r>(
        relations: &'r [cql::Relation],
        col: &'r str,
    ) -> impl Iterator<Item = &'r cql::Relation> + 'r {
        relations.iter().filter(move |r| r.column == col)
    }
    let is_eq_or_in =
        |r: &cql::Relation| matches!(r.rhs, Rhs::Cmp(Op::Eq, _) | Rhs::In(_) | Rhs::InBind(_));
    let pk_lookup = pk_cols
        .iter()
        .all(|c| on(relations, c).count() == 1 && on(relations, c).all(is_eq_or_in));
    let mut needs_filtering = false;
    if pk_lookup {
        // Clustering restrictions are fine when every earlier clustering
        // column is restricted by equality.
        let mut prefix_eq = true;
        for c in &ck_cols {
            let restricted = on(relations, c).count() > 0;
            if restricted && !prefix_eq {
                needs_filtering = true;
            }
            prefix_eq &= on(relations, c).any(|r| matches!(r.rhs, Rhs::Cmp(Op::Eq, _)));
        }
    } else if relations
        .iter()
        .any(|r| pk_cols.contains(&&r.column) || ck_cols.contains(&&r.column))
    {
        needs_filtering = true;
    }
    if relations
        .iter()
        .any(|r| !pk_cols.contains(&&r.column) && !ck_cols.contains(&&r.column))
    {
        needs_filtering = true;
    }
    if needs_filtering && !allow_filtering {
        return Err(invalid(
            "Cannot execute this query as it might involve data filtering and thus may have \
             unpredictable performance. If you want to execute this query despite the \
             performance unpredictability, use ALLOW FILTERING",
        ));
    }
    Ok(pk_lookup)
}

#[derive(Debug, Clone)]
enum Restriction {
    Cmp(Op, CqlValue),
    In(Vec<CqlValue>),
}

/// Whether `value <op> bound` holds, given `value.cmp(bound)`.
fn op_holds(op: Op, ord: Ordering) -> bool {
    match op {
        Op::Eq => ord == Ordering::Equal,
        Op::Lt => ord == Ordering::Less,
        Op::Gt => ord == Ordering::Greater,
        Op::Le => ord != Ordering::Greater,
        Op::Ge => ord != Ordering::Less,
    }
}

/// Token of a stored partition; keys of unhashable types sort first.
fn partition_token(pk: &PartitionKeyValue) -> i64 {
    token_of_partition(pk).unwrap_or(i64::MIN)
}

/// The partition key columns and their types, in key order.
fn partition_key_columns(schema: &TableSchema) -> Result<Vec<(&String, &ColumnType)>> {
    schema
        .partition_key
        .into_iter()
        .map(|c| Ok((c, column_type(schema, c)?)))
        .collect()
}

/// `token(...)` must name exactly the partition key columns, in order.
fn check_token_args(schema: &TableSchema, args: &[String]) -> Result<()> {
    let pk: Vec<&String> = schema.partition_key.into_iter().collect();
    if args.len() != pk.len() || args.iter().zip(&pk).any(|(a, k)| a != *k) {
        for a in args {
            column_type(schema, a)?;
        }
        return Err(invalid(format!(
            "The token function arguments must be the partition key columns in order: \
             token({})",
            pk.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

/// Validates the `token(...)` restrictions of a SELECT and describes their
/// markers: `token(?)` binds a partition key value, a bare `?` a bigint token.
fn describe_token_relations(
    schema: &TableSchema,
    sel: &cql::Select,
    vars: &mut [Option<VarSpec>],
) -> Result<()> {
    if sel.token_relations.is_empty() {
        return Ok(());
    }
    let pk = partition_key_columns(schema)?;
    if let Some(rel) = sel
        .relations
        .iter()
        .find(|r| pk.iter().any(|(c, _)| **c == r.column))
    {
        return Err(invalid(format!(
            "Columns \"{}\" cannot be restricted by both a normal relation and a token relation",
            rel.column
        )));
    }
    for rel in &sel.token_relations {
        check_token_args(schema, &rel.columns)?;
        match &rel.value {
            TokenValue::Term(Term::Bind(m)) => {
                vars[*m] = Some(var("partition key token", &ColumnType::BigInt));
            }
            TokenValue::Term(Term::Lit(_)) => {}
            TokenValue::Token(terms) => {
                if terms.len() != pk.len() {
                    return Err(invalid(format!(
                        "Invalid number of arguments in call to function token: {} required \
                         but {} provided",
                        pk.len(),
                        terms.len()
                    )));
                }
                for (term, (col, ty)) in terms.iter().zip(&pk) {
                    if let Term::Bind(m) = term {
                        vars[*m] = Some(var(col, ty));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Binds the `token(...)` restrictions to `(op, token)` bounds.
fn bind_token_relations(
    schema: &TableSchema,
    relations: &[cql::TokenRelation],
    values: &[Value<'_>],
) -> Result<Vec<(Op, i64)>> {
    let pk = partition_key_columns(schema)?;
    let mut out = Vec::new();
    for rel in relations {
        let token = match &rel.value {
            TokenValue::Term(term) => {
                match bind_non_null(term, &ColumnType::BigInt, values, "partition key token")? {
                    CqlValue::BigInt(t) => t,
                    _ => return Err(invalid("a token must be a bigint")),
                }
            }
            TokenValue::Token(terms) => {
                let key = terms
                    .iter()
                    .zip(&pk)
                    .map(|(term, (col, ty))| bind_non_null(term, ty, values, col))
                    .collect::<Result<Vec<_>>>()?;
                let bytes = partition_key_bytes(&key)
                    .ok_or_else(|| invalid("cannot compute the token of this partition key"))?;
                token_of_bytes(&bytes)
            }
        };
        out.push((rel.op, token));
    }
    Ok(out)
}

fn check_writable(ks: &str) -> Result<()> {
    if SYSTEM_KEYSPACES.contains(&ks) {
        return Err(Error::new(
            DbError::Unauthorized,
            format!("{ks} keyspace is not user-modifiable"),
        ));
    }
    Ok(())
}

/// The table a (resolved) DML / TRUNCATE statement works on.
fn statement_table(statement: &Statement) -> Option<(&str, &str)> {
    match statement {
        Statement::Select(s) => Some(table_of(&s.table)),
        Statement::Insert(i) => Some(table_of(&i.table)),
        Statement::Update(u) => Some(table_of(&u.table)),
        Statement::Delete(d) => Some(table_of(&d.table)),
        Statement::Truncate(t) => Some(table_of(t)),
        Statement::Use(_)
        | Statement::CreateKeyspace(_)
        | Statement::CreateTable(_)
        | Statement::DropTable(_) => None,
    }
}

fn table_of(t: &cql::TableName) -> (&str, &str) {
    (t.keyspace.as_deref().unwrap_or(""), t.name.as_str())
}

fn var(name: &str, ty: &ColumnType) -> VarSpec {
    VarSpec {
        name: name.to_owned(),
        ty: ty.clone(),
    }
}

fn text_of(v: &CqlValue) -> Option<String> {
    match v {
        CqlValue::Text(s) | CqlValue::Ascii(s) => Some(s.clone()),
        _ => None,
    }
}

fn non_empty(v: CqlValue) -> Option<CqlValue> {
    (v != CqlValue::Empty).then_some(v)
}

fn applied(ks: &str, table: &str, ok: bool) -> Outcome {
    applied_rows(
        ks,
        table,
        vec![("[applied]".to_owned(), ColumnType::Boolean)],
        vec![Some(CqlValue::Boolean(ok))],
    )
}

fn applied_rows(
    ks: &str,
    table: &str,
    columns: Vec<(String, ColumnType)>,
    values: Vec<Option<CqlValue>>,
) -> Outcome {
    Outcome::Rows(RowSet {
        keyspace: ks.to_owned(),
        table: table.to_owned(),
        columns,
        rows: vec![values],
        paging_state: None,
    })
}

fn column_type<'s>(schema: &'s TableSchema, col: &str) -> Result<&'s ColumnType> {
    schema
        .columns
        .get(col)
        .map(|c| &c.ty)
        .ok_or_else(|| invalid(format!("Undefined column name {col}")))
}

fn is_key(schema: &TableSchema, col: &str) -> bool {
    schema
        .partition_key
        .into_iter()
        .chain(&schema.clustering_key)
        .any(|k| k == col)
}

/// Describes the markers used in WHERE relations.
fn describe_relations(
    schema: &TableSchema,
    relations: &[cql::Relation],
    vars: &mut [Option<VarSpec>],
    pk_binds: &mut HashMap<String, usize>,
) -> Result<()> {
    for rel in relations {
        let ty = column_type(schema, &rel.column)?;
        match &rel.rhs {
            Rhs::Cmp(op, Term::Bind(m)) => {
                vars[*m] = Some(var(&rel.column, ty));
                if *op == Op::Eq {
                    pk_binds.insert(rel.column.clone(), *m);
                }
            }
            Rhs::Cmp(_, Term::Lit(_)) => {}
            Rhs::In(terms) => {
                for t in terms {
                    if let Term::Bind(m) = t {
                        vars[*m] = Some(var(&rel.column, ty));
                    }
                }
            }
            Rhs::InBind(m) => {
                vars[*m] = Some(var(
                    &format!("in({})", rel.column),
                    &ColumnType::List(Box::new(ty.clone())),
                ));
            }
        }
    }
    Ok(())
}

/// One value of a result row.
#[derive(Debug, Clone)]
enum Output {
    /// A column of the row.
    Column(String),
    /// `token(<partition key>)`.
    Token,
}

/// What each result column of a selection is computed from.
fn select_outputs(schema: &TableSchema, selection: &Selection) -> Vec<Output> {
    match selection {
        Selection::All => all_columns(schema)
            .into_iter()
            .map(|(c, _)| Output::Column(c))
            .collect(),
        Selection::Count(_) => Vec::new(),
        Selection::Columns(cols) => cols
            .iter()
            .map(|(s, _)| match s {
                Selector::Column(c) => Output::Column(c.clone()),
                Selector::Token(_) => Output::Token,
            })
            .collect(),
    }
}

/// `(name, type)` of every column, keys first, as `SELECT *` returns them.
fn all_columns(schema: &TableSchema) -> Vec<(String, ColumnType)> {
    let mut out: Vec<(String, ColumnType)> = Vec::new();
    for key in schema
        .partition_key
        .into_iter()
        .chain(&schema.clustering_key)
    {
        if let Some(c) = schema.columns.get(key) {
            out.push((key.clone(), c.ty.clone()));
        }
    }
    let mut regular: Vec<(String, ColumnType)> = schema
        .columns
        .iter()
        .filter(|(name, _)| !is_key(schema, name))
        .map(|(name, c)| (name.clone(), c.ty.clone()))
        .collect();
    regular.sort_by(|a, b| a.0.cmp(&b.0));
    out.extend(regular);
    out
}

/// Result metadata columns (aliases applied).
fn select_columns(
    schema: &TableSchema,
    selection: &Selection,
) -> Result<Vec<(String, ColumnType)>> {
    match selection {
        Selection::All => Ok(all_columns(schema)),
        Selection::Count(name) => Ok(vec![(name.clone(), ColumnType::BigInt)]),
        Selection::Columns(cols) => cols
            .iter()
            .map(|(s, alias)| match s {
                Selector::Column(c) => {
                    let ty = column_type(schema, c)?;
                    Ok((alias.clone().unwrap_or_else(|| c.clone()), ty.clone()))
                }
                Selector::Token(args) => {
                    check_token_args(schema, args)?;
                    let name = format!("system.token({})", args.join(", "));
                    Ok((alias.clone().unwrap_or(name), ColumnType::BigInt))
                }
            })
            .collect(),
    }
}

fn cartesian(columns: &[Vec<CqlValue>]) -> Vec<Vec<CqlValue>> {
    let mut out: Vec<Vec<CqlValue>> = vec![Vec::new()];
    for options in columns {
        let mut next = Vec::with_capacity(out.len() * options.len());
        for prefix in &out {
            for v in options {
                let mut p = prefix.clone();
                p.push(v.clone());
                next.push(p);
            }
        }
        out = next;
    }
    out
}

fn make_partition_key(
    schema: &TableSchema,
    mut values: Vec<CqlValue>,
) -> Result<PartitionKeyValue> {
    match &schema.partition_key {
        PrimaryKey::Empty => Err(invalid("table has no partition key")),
        PrimaryKey::Simple(_) => values
            .pop()
            .map(PartitionKeyValue::Simple)
            .ok_or_else(|| invalid("missing partition key")),
        PrimaryKey::Composite(_) => Ok(PartitionKeyValue::Composite(values)),
    }
}

fn make_clustering_key(schema: &TableSchema, mut values: Vec<CqlValue>) -> ClusteringKeyValue {
    match &schema.clustering_key {
        PrimaryKey::Empty => ClusteringKeyValue::Empty,
        PrimaryKey::Simple(_) => ClusteringKeyValue::Simple(values.pop()),
        PrimaryKey::Composite(_) => {
            ClusteringKeyValue::Composite(values.into_iter().map(Some).collect())
        }
    }
}

fn partition_key(
    schema: &TableSchema,
    row: &HashMap<String, CqlValue>,
) -> Result<PartitionKeyValue> {
    let values = schema
        .partition_key
        .into_iter()
        .map(|k| {
            row.get(k)
                .cloned()
                .ok_or_else(|| invalid(format!("Missing mandatory PRIMARY KEY part {k}")))
        })
        .collect::<Result<Vec<_>>>()?;
    make_partition_key(schema, values)
}

fn clustering_key(
    schema: &TableSchema,
    row: &HashMap<String, CqlValue>,
) -> Result<ClusteringKeyValue> {
    let values = schema
        .clustering_key
        .into_iter()
        .map(|k| {
            row.get(k)
                .cloned()
                .ok_or_else(|| invalid(format!("Missing mandatory PRIMARY KEY part {k}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(make_clustering_key(schema, values))
}

/// The key columns as row values (kassandra keeps them in the row map).
fn key_columns(
    schema: &TableSchema,
    pk: &PartitionKeyValue,
    ck: &ClusteringKeyValue,
) -> Vec<(String, CqlValue)> {
    let pk_values = pk.into_iter().cloned();
    let ck_values = ck.into_iter().filter_map(|v| v.clone());
    schema
        .partition_key
        .into_iter()
        .cloned()
        .zip(pk_values)
        .chain(schema.clustering_key.into_iter().cloned().zip(ck_values))
        .collect()
}

/// Keys addressed by the WHERE clause of UPDATE / DELETE. Only `=` and `IN`
/// on primary key columns are allowed. With `full_row`, every clustering
/// column must be given; otherwise either all or none (whole partition).
fn key_values(
    schema: &TableSchema,
    relations: &[cql::Relation],
    values: &[Value<'_>],
    full_row: bool,
) -> Result<Vec<(PartitionKeyValue, ClusteringKeyValue)>> {
    let mut per_column: HashMap<&str, Vec<CqlValue>> = HashMap::new();
    for rel in relations {
        let ty = column_type(schema, &rel.column)?;
        if !is_key(schema, &rel.column) {
            return Err(invalid(format!(
                "Non PRIMARY KEY columns found in where clause: {}",
                rel.column
            )));
        }
        let vals = match &rel.rhs {
            Rhs::Cmp(Op::Eq, t) => vec![bind_non_null(t, ty, values, &rel.column)?],
            Rhs::In(ts) => ts
                .iter()
                .map(|t| bind_non_null(t, ty, values, &rel.column))
                .collect::<Result<_>>()?,
            Rhs::InBind(m) => bind_in_list(*m, ty, values, &rel.column)?,
            Rhs::Cmp(..) => {
                return Err(invalid(
                    "unsupported by cql-server: range restrictions in UPDATE / DELETE",
                ))
            }
        };
        if per_column.insert(&rel.column, vals).is_some() {
            return Err(invalid(format!(
                "{} cannot be restricted more than once",
                rel.column
            )));
        }
    }
    let pk_cols: Vec<&String> = schema.partition_key.into_iter().collect();
    let ck_cols: Vec<&String> = schema.clustering_key.into_iter().collect();
    let mut pk_lists = Vec::new();
    for c in &pk_cols {
        pk_lists.push(
            per_column
                .get(c.as_str())
                .cloned()
                .ok_or_else(|| invalid(format!("Some partition key parts are missing: {c}")))?,
        );
    }
    let given_ck = ck_cols
        .iter()
        .filter(|c| per_column.contains_key(c.as_str()))
        .count();
    let ck_lists: Vec<Vec<CqlValue>> = if given_ck == ck_cols.len() {
        ck_cols
            .iter()
            .map(|c| per_column.get(c.as_str()).cloned().unwrap_or_default())
            .collect()
    } else if given_ck == 0 && !full_row {
        Vec::new()
    } else {
        return Err(invalid(
            "unsupported by cql-server: the WHERE clause must give the full primary key \
             (or, for DELETE of a whole partition, only the partition key)",
        ));
    };
    let mut out = Vec::new();
    for pk_values in cartesian(&pk_lists) {
        let pk = make_partition_key(schema, pk_values)?;
        if ck_lists.is_empty() {
            out.push((pk, ClusteringKeyValue::Empty));
            continue;
        }
        for ck_values in cartesian(&ck_lists) {
            out.push((pk.clone(), make_clustering_key(schema, ck_values)));
        }
    }
    Ok(out)
}

/// Range of clustering keys matching an equality prefix.
fn clustering_range(schema: &TableSchema, prefix: Vec<CqlValue>) -> CkRange {
    let n = schema.clustering_key.count();
    if prefix.is_empty() || n == 0 {
        return ALL_CK;
    }
    if prefix.len() == n {
        let key = make_clustering_key(schema, prefix);
        return (Bound::Included(key.clone()), Bound::Included(key));
    }
    // Composite prefix: `Some(CqlValue::Empty)` sorts after every real value.
    let mut upper: Vec<Option<CqlValue>> = prefix.iter().cloned().map(Some).collect();
    upper.resize(n, Some(CqlValue::Empty));
    (
        Bound::Included(ClusteringKeyValue::Composite(
            prefix.into_iter().map(Some).collect(),
        )),
        Bound::Included(ClusteringKeyValue::Composite(upper)),
    )
}

fn compare(a: &CqlValue, b: &CqlValue) -> Option<Ordering> {
    match (a, b) {
        (CqlValue::Double(x), CqlValue::Double(y)) => {
            f64::from_bits(*x).partial_cmp(&f64::from_bits(*y))
        }
        (CqlValue::Float(x), CqlValue::Float(y)) => {
            f32::from_bits(*x).partial_cmp(&f32::from_bits(*y))
        }
        (a, b) if std::mem::discriminant(a) == std::mem::discriminant(b) => Some(a.cmp(b)),
        _ => None,
    }
}

fn bind(term: &Term, ty: &ColumnType, values: &[Value<'_>]) -> Result<Bound_> {
    match term {
        Term::Lit(lit) => Ok(match literal(lit, ty)? {
            Some(v) => Bound_::Val(v),
            None => Bound_::Null,
        }),
        Term::Bind(m) => match values.get(*m) {
            Some(Value::Bytes(b)) => Ok(Bound_::Val(decode(b, ty)?)),
            Some(Value::Null) => Ok(Bound_::Null),
            Some(Value::Unset) => Ok(Bound_::Unset),
            None => Err(invalid("missing bound value")),
        },
    }
}

fn bind_non_null(
    term: &Term,
    ty: &ColumnType,
    values: &[Value<'_>],
    col: &str,
) -> Result<CqlValue> {
    match bind(term, ty, values)? {
        Bound_::Val(v) => Ok(v),
        Bound_::Null => Err(invalid(format!(
            "Invalid null value in condition for column {col}"
        ))),
        Bound_::Unset => Err(invalid(format!("Invalid unset value for column {col}"))),
    }
}

fn bind_in_list(
    m: usize,
    ty: &ColumnType,
    values: &[Value<'_>],
    col: &str,
) -> Result<Vec<CqlValue>> {
    let list_ty = ColumnType::List(Box::new(ty.clone()));
    match bind_non_null(&Term::Bind(m), &list_ty, values, col)? {
        CqlValue::List(items) => Ok(items),
        _ => Err(invalid("IN value must be a list")),
    }
}

fn parse_int<T: std::str::FromStr>(s: &str, ty: &ColumnType) -> Result<T> {
    s.parse()
        .map_err(|_| invalid(format!("Invalid {} constant ({s})", type_name(ty))))
}

/// Converts a CQL literal to a value of the column type (`None` = null).
fn literal(lit: &Lit, ty: &ColumnType) -> Result<Option<CqlValue>> {
    use ColumnType as T;
    let mismatch = || {
        invalid(format!(
            "Invalid literal {lit:?} for a column of type {}",
            type_name(ty)
        ))
    };
    let v = match (ty, lit) {
        (_, Lit::Null) => return Ok(None),
        (T::Text, Lit::Str(s)) => CqlValue::Text(s.clone()),
        (T::Ascii, Lit::Str(s)) if s.is_ascii() => CqlValue::Ascii(s.clone()),
        (T::Inet, Lit::Str(s)) => CqlValue::Inet(s.parse().map_err(|_| mismatch())?),
        (T::Uuid, Lit::Str(s)) => CqlValue::Uuid(s.parse().map_err(|_| mismatch())?),
        (T::Timeuuid, Lit::Str(s)) => CqlValue::Timeuuid(s.parse().map_err(|_| mismatch())?),
        (T::Uuid, Lit::Uuid(u)) => CqlValue::Uuid(*u),
        (T::Timeuuid, Lit::Uuid(u)) => CqlValue::Timeuuid(*u),
        (T::Int, Lit::Int(s)) => CqlValue::Int(parse_int(s, ty)?),
        (T::BigInt, Lit::Int(s)) => CqlValue::BigInt(parse_int(s, ty)?),
        (T::SmallInt, Lit::Int(s)) => CqlValue::SmallInt(parse_int(s, ty)?),
        (T::TinyInt, Lit::Int(s)) => CqlValue::TinyInt(parse_int(s, ty)?),
        (T::Timestamp, Lit::Int(s)) => CqlValue::Timestamp(parse_int(s, ty)?),
        (T::Time, Lit::Int(s)) => CqlValue::Time(parse_int(s, ty)?),
        (T::Date, Lit::Int(s)) => CqlValue::Date(parse_int(s, ty)?),
        (T::Double, Lit::Int(s)) => CqlValue::Double(parse_int::<f64>(s, ty)?.to_bits()),
        (T::Float, Lit::Int(s)) => CqlValue::Float(parse_int::<f32>(s, ty)?.to_bits()),
        (T::Double, Lit::Float(f)) => CqlValue::Double(f.to_bits()),
        (T::Float, Lit::Float(f)) => CqlValue::Float((*f as f32).to_bits()),
        (T::Boolean, Lit::Bool(b)) => CqlValue::Boolean(*b),
        (T::Blob, Lit::Blob(b)) => CqlValue::Blob(b.clone()),
        (T::List(item), Lit::List(items)) => CqlValue::List(literal_items(items, item)?),
        (T::List(_), Lit::Map(m)) if m.is_empty() => CqlValue::List(Vec::new()),
        (T::Set(item), Lit::Set(items) | Lit::List(items)) => {
            CqlValue::Set(sorted_set(literal_items(items, item)?))
        }
        (T::Set(_), Lit::Map(m)) if m.is_empty() => CqlValue::Set(Vec::new()),
        (T::Map(kt, vt), Lit::Map(entries)) => {
            let mut out = Vec::new();
            for (k, v) in entries {
                let k = literal(k, kt)?.ok_or_else(|| invalid("null map key"))?;
                let v = literal(v, vt)?.ok_or_else(|| invalid("null map value"))?;
                out.push((k, v));
            }
            CqlValue::Map(sorted_map(out))
        }
        _ => return Err(mismatch()),
    };
    Ok(Some(v))
}

fn literal_items(items: &[Lit], ty: &ColumnType) -> Result<Vec<CqlValue>> {
    items
        .iter()
        .map(|i| literal(i, ty)?.ok_or_else(|| invalid("null inside a collection literal")))
        .collect()
}

fn sorted_set(mut items: Vec<CqlValue>) -> Vec<CqlValue> {
    items.sort();
    items.dedup();
    items
}

fn sorted_map(mut entries: Vec<(CqlValue, CqlValue)>) -> Vec<(CqlValue, CqlValue)> {
    // Later entries win, like repeated keys in Cassandra.
    entries.reverse();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries.dedup_by(|a, b| a.0 == b.0);
    entries
}

/// Decodes a bound value strictly (kassandra's decoder panics on short input).
fn decode(b: &[u8], ty: &ColumnType) -> Result<CqlValue> {
    use ColumnType as T;
    let bad = || {
        invalid(format!(
            "Invalid value of {} bytes for type {}",
            b.len(),
            type_name(ty)
        ))
    };
    fn arr<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
        b.try_into().ok()
    }
    Ok(match ty {
        T::Text => CqlValue::Text(
            std::str::from_utf8(b)
                .map_err(|_| invalid("Invalid UTF-8 bytes for a text value"))?
                .to_owned(),
        ),
        T::Ascii if b.is_ascii() => CqlValue::Ascii(String::from_utf8_lossy(b).into_owned()),
        T::Blob => CqlValue::Blob(b.to_vec()),
        T::Boolean => CqlValue::Boolean(arr::<1>(b).ok_or_else(bad)?[0] != 0),
        T::Int => CqlValue::Int(i32::from_be_bytes(arr(b).ok_or_else(bad)?)),
        T::BigInt => CqlValue::BigInt(i64::from_be_bytes(arr(b).ok_or_else(bad)?)),
        T::SmallInt => CqlValue::SmallInt(i16::from_be_bytes(arr(b).ok_or_else(bad)?)),
        T::TinyInt => CqlValue::TinyInt(i8::from_be_bytes(arr(b).ok_or_else(bad)?)),
        T::Timestamp => CqlValue::Timestamp(i64::from_be_bytes(arr(b).ok_or_else(bad)?)),
        T::Time => CqlValue::Time(i64::from_be_bytes(arr(b).ok_or_else(bad)?)),
        T::Date => CqlValue::Date(u32::from_be_bytes(arr(b).ok_or_else(bad)?)),
        T::Double => CqlValue::Double(u64::from_be_bytes(arr(b).ok_or_else(bad)?)),
        T::Float => CqlValue::Float(u32::from_be_bytes(arr(b).ok_or_else(bad)?)),
        T::Uuid => CqlValue::Uuid(Uuid::from_bytes(arr(b).ok_or_else(bad)?)),
        T::Timeuuid => CqlValue::Timeuuid(Uuid::from_bytes(arr(b).ok_or_else(bad)?)),
        T::Inet => match b.len() {
            4 => CqlValue::Inet(IpAddr::from(arr::<4>(b).ok_or_else(bad)?)),
            16 => CqlValue::Inet(IpAddr::from(arr::<16>(b).ok_or_else(bad)?)),
            _ => return Err(bad()),
        },
        T::List(item) => CqlValue::List(decode_list(b, item)?),
        T::Set(item) => CqlValue::Set(sorted_set(decode_list(b, item)?)),
        T::Map(kt, vt) => {
            let mut entries = Vec::new();
            let mut rest = b;
            let n = take_i32(&mut rest).ok_or_else(bad)?;
            for _ in 0..n.max(0) {
                let k = take_bytes(&mut rest).ok_or_else(bad)?;
                let v = take_bytes(&mut rest).ok_or_else(bad)?;
                entries.push((decode(k, kt)?, decode(v, vt)?));
            }
            if !rest.is_empty() {
                return Err(bad());
            }
            CqlValue::Map(sorted_map(entries))
        }
        _ => return Err(bad()),
    })
}

/// Decodes a list / set value: `[int n]` then `n` elements.
fn decode_list(b: &[u8], ty: &ColumnType) -> Result<Vec<CqlValue>> {
    let bad = || invalid("Invalid collection value");
    let mut rest = b;
    let n = take_i32(&mut rest).ok_or_else(bad)?;
    let mut out = Vec::new();
    for _ in 0..n.max(0) {
        let raw = take_bytes(&mut rest).ok_or_else(bad)?;
        out.push(decode(raw, ty)?);
    }
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

fn take_i32(rest: &mut &[u8]) -> Option<i32> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(i32::from_be_bytes(*head))
}

/// A collection element: `[int n][n bytes]`; null elements are rejected.
fn take_bytes<'b>(rest: &mut &'b [u8]) -> Option<&'b [u8]> {
    let n = usize::try_from(take_i32(rest)?).ok()?;
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

/// CQL name of a type, as written to `system_schema.columns.type`.
pub fn type_name(ty: &ColumnType) -> String {
    use ColumnType as T;
    match ty {
        T::Custom(c) => format!("'{c}'"),
        T::Ascii => "ascii".into(),
        T::Boolean => "boolean".into(),
        T::Blob => "blob".into(),
        T::Counter => "counter".into(),
        T::Date => "date".into(),
        T::Decimal => "decimal".into(),
        T::Double => "double".into(),
        T::Duration => "duration".into(),
        T::Float => "float".into(),
        T::Int => "int".into(),
        T::BigInt => "bigint".into(),
        T::Text => "text".into(),
        T::Timestamp => "timestamp".into(),
        T::Inet => "inet".into(),
        T::List(i) => format!("list<{}>", type_name(i)),
        T::Map(k, v) => format!("map<{}, {}>", type_name(k), type_name(v)),
        T::Set(i) => format!("set<{}>", type_name(i)),
        T::UserDefinedType { type_name: n, .. } => n.clone(),
        T::SmallInt => "smallint".into(),
        T::TinyInt => "tinyint".into(),
        T::Time => "time".into(),
        T::Timeuuid => "timeuuid".into(),
        T::Tuple(items) => format!(
            "tuple<{}>",
            items.iter().map(type_name).collect::<Vec<_>>().join(", ")
        ),
        T::Uuid => "uuid".into(),
        T::Varint => "varint".into(),
    }
}

/// Deterministic 128-bit FNV-1a hash, used as prepared statement id.
fn fnv128(keyspace: &str, cql: &str) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h = OFFSET;
    for b in keyspace.bytes().chain([0u8]).chain(cql.bytes()) {
        h ^= b as u128;
        h = h.wrapping_mul(PRIME);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Db {
        let mut db = Db::new([127, 0, 0, 1].into(), 9042);
        for q in [
            "CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
            "CREATE TABLE ks.t (k int PRIMARY KEY, v text)",
            "CREATE TABLE ks.other (k int, c int, b text, a text, PRIMARY KEY (k, c))",
            "INSERT INTO ks.t (k, v) VALUES (1, 'one')",
            "INSERT INTO ks.t (k, v) VALUES (2, 'two')",
            "INSERT INTO ks.other (k, c, b, a) VALUES (1, 2, 'b', 'a')",
            "CREATE KEYSPACE ks2 WITH replication = {'class': 'NetworkTopologyStrategy', 'datacenter1': 3}",
            "CREATE TABLE ks2.t (k int PRIMARY KEY, v text)",
            "INSERT INTO ks2.t (k, v) VALUES (1, 'same name, other keyspace')",
        ] {
            run(&mut db, q);
        }
        db
    }

    fn query(db: &mut Db, cql: &str) -> Result<Outcome> {
        db.query(&mut None, cql, &Options::default())
    }

    fn run(db: &mut Db, cql: &str) -> Outcome {
        query(db, cql).unwrap_or_else(|e| panic!("{cql}: {e:?}"))
    }

    fn rows(db: &mut Db, cql: &str) -> RowSet {
        match run(db, cql) {
            Outcome::Rows(rows) => rows,
            other => panic!("{cql}: expected rows, got {other:?}"),
        }
    }

    fn execute(db: &mut Db, id: u128) -> Result<Outcome> {
        db.execute(&mut None, &id.to_be_bytes(), &Options::default())
    }

    fn prepare(db: &mut Db, cql: &str) -> u128 {
        match db.prepare(None, cql) {
            Ok(Outcome::Prepared(p)) => p.id,
            other => panic!("{cql}: {other:?}"),
        }
    }

    fn assert_unconfigured(result: Result<Outcome>, table: &str) {
        match result {
            Err(e) => {
                assert_eq!(e.error, DbError::Invalid, "{e:?}");
                assert_eq!(e.reason, format!("unconfigured table {table}"));
            }
            Ok(o) => panic!("expected 'unconfigured table {table}', got {o:?}"),
        }
    }

    fn schema_tables(db: &mut Db) -> Vec<String> {
        let rows = rows(
            db,
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = 'ks'",
        );
        let mut names: Vec<String> = rows
            .rows
            .iter()
            .filter_map(|r| r[0].as_ref().and_then(text_of))
            .collect();
        names.sort();
        names
    }

    fn schema_columns(db: &mut Db) -> Vec<(String, String)> {
        let rows = rows(
            db,
            "SELECT table_name, column_name FROM system_schema.columns WHERE keyspace_name = 'ks'",
        );
        let mut columns: Vec<(String, String)> = rows
            .rows
            .iter()
            .filter_map(|r| {
                Some((
                    r[0].as_ref().and_then(text_of)?,
                    r[1].as_ref().and_then(text_of)?,
                ))
            })
            .collect();
        columns.sort();
        columns
    }

    #[test]
    fn drop_table_then_select_fails() {
        let mut db = db();
        let other_columns = rows(&mut db, "SELECT * FROM ks.other").columns;
        match run(&mut db, "DROP TABLE ks.t") {
            Outcome::SchemaChange {
                change,
                keyspace,
                table,
            } => {
                assert_eq!(change, SchemaChange::Dropped);
                assert_eq!(change.as_str(), "DROPPED");
                assert_eq!(keyspace, "ks");
                assert_eq!(table.as_deref(), Some("t"));
            }
            other => panic!("{other:?}"),
        }
        assert_unconfigured(query(&mut db, "SELECT * FROM ks.t"), "ks.t");
        assert_unconfigured(
            query(&mut db, "INSERT INTO ks.t (k, v) VALUES (3, 'x')"),
            "ks.t",
        );
        assert_unconfigured(query(&mut db, "TRUNCATE ks.t"), "ks.t");
        assert!(db.prepare(None, "SELECT * FROM ks.t").is_err());
        // The driver no longer sees the table in system_schema.
        assert_eq!(schema_tables(&mut db), vec!["other"]);
        assert!(schema_columns(&mut db).iter().all(|(t, _)| t == "other"));
        assert_eq!(schema_columns(&mut db).len(), 4);
        // Other tables keep their schema (column order included) and rows.
        let other = rows(&mut db, "SELECT * FROM ks.other");
        assert_eq!(other.columns, other_columns);
        assert_eq!(other.rows.len(), 1);
        // A table of the same name in another keyspace is untouched.
        assert_eq!(rows(&mut db, "SELECT * FROM ks2.t").rows.len(), 1);
        let ks2 = rows(
            &mut db,
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = 'ks2'",
        );
        assert_eq!(ks2.rows, vec![vec![Some(CqlValue::Text("t".into()))]]);
        // The keyspaces are still usable.
        run(&mut db, "CREATE TABLE ks.third (k int PRIMARY KEY)");
        run(&mut db, "CREATE TABLE ks2.u (k int PRIMARY KEY)");
        assert_eq!(schema_tables(&mut db), vec!["other", "third"]);
    }

    #[test]
    fn drop_table_if_exists_on_missing_table_succeeds() {
        let mut db = db();
        assert!(matches!(
            run(&mut db, "DROP TABLE IF EXISTS ks.nope"),
            Outcome::Void
        ));
        assert!(matches!(
            run(&mut db, "drop table if exists no_such_ks.t"),
            Outcome::Void
        ));
        assert!(matches!(
            run(&mut db, "DROP TABLE IF EXISTS ks.t"),
            Outcome::SchemaChange { .. }
        ));
        assert!(matches!(
            run(&mut db, "DROP TABLE IF EXISTS ks.t"),
            Outcome::Void
        ));
        assert_eq!(schema_tables(&mut db), vec!["other"]);
    }

    #[test]
    fn drop_table_without_if_exists_on_missing_table_errors() {
        let mut db = db();
        assert_unconfigured(query(&mut db, "DROP TABLE ks.nope"), "ks.nope");
        assert_unconfigured(query(&mut db, "DROP TABLE no_such_ks.t"), "no_such_ks.t");
        run(&mut db, "DROP TABLE ks.t");
        assert_unconfigured(query(&mut db, "DROP TABLE ks.t"), "ks.t");
        // No keyspace given and none in use.
        assert!(query(&mut db, "DROP TABLE other").is_err());
        // System tables cannot be dropped.
        let err = query(&mut db, "DROP TABLE IF EXISTS system.local").unwrap_err();
        assert_eq!(err.error, DbError::Unauthorized);
        assert_eq!(rows(&mut db, "SELECT key FROM system.local").rows.len(), 1);
    }

    #[test]
    fn create_after_drop_is_empty() {
        let mut db = db();
        run(&mut db, "DROP TABLE ks.t");
        assert!(matches!(
            run(
                &mut db,
                "CREATE TABLE IF NOT EXISTS ks.t (k int PRIMARY KEY, w bigint)"
            ),
            Outcome::SchemaChange {
                change: SchemaChange::Created,
                ..
            }
        ));
        let t = rows(&mut db, "SELECT * FROM ks.t");
        assert!(t.rows.is_empty(), "{:?}", t.rows);
        assert_eq!(
            t.columns,
            vec![
                ("k".to_owned(), ColumnType::Int),
                ("w".to_owned(), ColumnType::BigInt)
            ]
        );
        assert!(query(&mut db, "SELECT v FROM ks.t").is_err());
        assert!(schema_columns(&mut db).contains(&("t".into(), "w".into())));
        assert!(!schema_columns(&mut db).contains(&("t".into(), "v".into())));
        run(&mut db, "INSERT INTO ks.t (k, w) VALUES (1, 10)");
        assert_eq!(rows(&mut db, "SELECT * FROM ks.t").rows.len(), 1);
    }

    #[test]
    fn prepared_statements_on_a_dropped_table_error() {
        let mut db = db();
        let select = prepare(&mut db, "SELECT * FROM ks.t");
        let insert = prepare(&mut db, "INSERT INTO ks.t (k, v) VALUES (5, 'five')");
        let truncate = prepare(&mut db, "TRUNCATE ks.t");
        let other = prepare(&mut db, "SELECT * FROM ks.other");
        let drop = prepare(&mut db, "DROP TABLE IF EXISTS ks.t");
        assert!(matches!(
            execute(&mut db, drop),
            Ok(Outcome::SchemaChange { .. })
        ));
        for id in [select, insert, truncate] {
            let err = execute(&mut db, id).unwrap_err();
            assert!(matches!(err.error, DbError::Unprepared { .. }), "{err:?}");
        }
        // Re-preparing (what the driver does on Unprepared) fails like Cassandra.
        assert!(db.prepare(None, "SELECT * FROM ks.t").is_err());
        assert!(matches!(execute(&mut db, other), Ok(Outcome::Rows(_))));
        assert!(matches!(execute(&mut db, drop), Ok(Outcome::Void)));
        // In a batch, too.
        let err = db
            .batch(
                None,
                vec![BatchItem::Prepared(&insert.to_be_bytes(), vec![])],
            )
            .unwrap_err();
        assert!(matches!(err.error, DbError::Unprepared { .. }), "{err:?}");
        // After re-creating the table the statements prepare and run again.
        run(&mut db, "CREATE TABLE ks.t (k int PRIMARY KEY, v text)");
        let select = prepare(&mut db, "SELECT * FROM ks.t");
        match execute(&mut db, select) {
            Ok(Outcome::Rows(rows)) => assert!(rows.rows.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn drop_table_with_use_keyspace() {
        let mut db = db();
        let mut keyspace = None;
        db.query(&mut keyspace, "USE ks", &Options::default())
            .unwrap();
        db.query(&mut keyspace, "DROP TABLE t", &Options::default())
            .unwrap();
        assert_unconfigured(query(&mut db, "SELECT * FROM ks.t"), "ks.t");
    }

    #[test]
    fn other_drop_forms_are_still_rejected() {
        let mut db = db();
        for q in [
            "DROP KEYSPACE ks",
            "DROP KEYSPACE IF EXISTS ks",
            "DROP INDEX ks.i",
            "DROP TYPE ks.ty",
        ] {
            let err = query(&mut db, q).unwrap_err();
            assert_eq!(err.error, DbError::Invalid, "{q}: {err:?}");
            assert!(err.reason.contains("not supported"), "{q}: {}", err.reason);
        }
        assert_eq!(schema_tables(&mut db), vec!["other", "t"]);
        assert_eq!(rows(&mut db, "SELECT * FROM ks.t").rows.len(), 2);
    }
}

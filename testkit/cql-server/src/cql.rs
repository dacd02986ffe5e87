//! A strict parser for the CQL subset that `cql-server` executes.
//!
//! kassandra's own nom parser accepts a prefix of a statement and silently
//! drops the rest (`... WHERE a IN (?, ?)` became a full table scan, `ORDER BY`
//! and `USING TTL` vanished), lower-cases nothing consistently and mis-reads
//! `''` escapes. This parser either understands the whole statement or
//! returns a syntax / "unsupported" error, and it numbers bind markers so the
//! prepared metadata can describe exactly the real `?` / `:name` markers.

use kassandra::cql::schema::ColumnType;
use uuid::Uuid;

/// Error produced by the lexer/parser; becomes a CQL `SyntaxError` or
/// `Invalid` error frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ParseError {
    /// Malformed CQL.
    Syntax(String),
    /// Well-formed CQL that cql-server deliberately does not implement.
    Unsupported(String),
}

type PResult<T> = Result<T, ParseError>;

fn syntax<T>(msg: impl Into<String>) -> PResult<T> {
    Err(ParseError::Syntax(msg.into()))
}

fn unsupported<T>(msg: impl Into<String>) -> PResult<T> {
    Err(ParseError::Unsupported(msg.into()))
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// Unquoted identifier or keyword, as written.
    Ident(String),
    /// `"Quoted"` identifier (case preserved).
    Quoted(String),
    Str(String),
    Int(String),
    Float(String),
    Blob(Vec<u8>),
    Uuid(Uuid),
    Sym(&'static str),
}

impl std::fmt::Display for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "{s}"),
            Tok::Quoted(s) => write!(f, "\"{s}\""),
            Tok::Str(s) => write!(f, "'{s}'"),
            Tok::Int(s) | Tok::Float(s) => write!(f, "{s}"),
            Tok::Blob(_) => write!(f, "<blob literal>"),
            Tok::Uuid(u) => write!(f, "{u}"),
            Tok::Sym(s) => write!(f, "{s}"),
        }
    }
}

const SYMBOLS: [&str; 20] = [
    "<=", ">=", "!=", "(", ")", ",", ";", ".", "*", "=", "<", ">", "?", ":", "[", "]", "{", "}",
    "+", "-",
];

fn lex(input: &str) -> PResult<Vec<Tok>> {
    let bytes = input.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let rest = &input[i..];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if rest.starts_with("--") || rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if let Some(comment) = rest.strip_prefix("/*") {
            match comment.find("*/") {
                Some(end) => i += end + 4,
                None => return syntax("unterminated comment"),
            }
        } else if c == b'\'' {
            let mut s = String::new();
            let mut j = i + 1;
            loop {
                match input[j..].find('\'') {
                    None => return syntax("unterminated string literal"),
                    Some(k) => {
                        s.push_str(&input[j..j + k]);
                        j += k + 1;
                        if input[j..].starts_with('\'') {
                            s.push('\'');
                            j += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            toks.push(Tok::Str(s));
            i = j;
        } else if let Some(dollar) = rest.strip_prefix("$$") {
            match dollar.find("$$") {
                Some(end) => {
                    toks.push(Tok::Str(dollar[..end].to_owned()));
                    i += end + 4;
                }
                None => return syntax("unterminated $$ string literal"),
            }
        } else if c == b'"' {
            let mut s = String::new();
            let mut j = i + 1;
            loop {
                match input[j..].find('"') {
                    None => return syntax("unterminated quoted identifier"),
                    Some(k) => {
                        s.push_str(&input[j..j + k]);
                        j += k + 1;
                        if input[j..].starts_with('"') {
                            s.push('"');
                            j += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            toks.push(Tok::Quoted(s));
            i = j;
        } else if let Some(uuid) = uuid_at(rest) {
            toks.push(Tok::Uuid(uuid));
            i += 36;
        } else if (rest.starts_with("0x") || rest.starts_with("0X"))
            && rest.len() > 2
            && rest.as_bytes()[2].is_ascii_hexdigit()
        {
            let hex: &str = &rest[2..];
            let len = hex
                .find(|ch: char| !ch.is_ascii_hexdigit())
                .unwrap_or(hex.len());
            let hex = &hex[..len];
            if !hex.len().is_multiple_of(2) {
                return syntax("blob literal must have an even number of hex digits");
            }
            let blob = (0..hex.len())
                .step_by(2)
                .map(|k| u8::from_str_radix(&hex[k..k + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| ParseError::Syntax("invalid blob literal".into()))?;
            toks.push(Tok::Blob(blob));
            i += 2 + len;
        } else if c.is_ascii_digit() {
            let mut j = i;
            while j < bytes.len() && bytes[j].is_ascii_digit() {
                j += 1;
            }
            let mut float = false;
            if j + 1 < bytes.len() && bytes[j] == b'.' && bytes[j + 1].is_ascii_digit() {
                float = true;
                j += 1;
                while j < bytes.len() && bytes[j].is_ascii_digit() {
                    j += 1;
                }
            }
            if j < bytes.len() && (bytes[j] == b'e' || bytes[j] == b'E') {
                let mut k = j + 1;
                if k < bytes.len() && (bytes[k] == b'+' || bytes[k] == b'-') {
                    k += 1;
                }
                if k < bytes.len() && bytes[k].is_ascii_digit() {
                    float = true;
                    j = k;
                    while j < bytes.len() && bytes[j].is_ascii_digit() {
                        j += 1;
                    }
                }
            }
            if j < bytes.len() && (bytes[j].is_ascii_alphabetic() || bytes[j] == b'_') {
                return syntax(format!("invalid token near '{}'", &input[i..=j]));
            }
            let text = input[i..j].to_owned();
            toks.push(if float {
                Tok::Float(text)
            } else {
                Tok::Int(text)
            });
            i = j;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let mut j = i;
            while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
                j += 1;
            }
            toks.push(Tok::Ident(input[i..j].to_owned()));
            i = j;
        } else if let Some(sym) = SYMBOLS.iter().find(|s| rest.starts_with(**s)) {
            toks.push(Tok::Sym(sym));
            i += sym.len();
        } else {
            let ch = rest.chars().next().unwrap_or('?');
            return syntax(format!("unexpected character '{ch}'"));
        }
    }
    Ok(toks)
}

fn uuid_at(s: &str) -> Option<Uuid> {
    let b = s.as_bytes();
    if b.len() < 36 {
        return None;
    }
    for (k, &ch) in b[..36].iter().enumerate() {
        let ok = if matches!(k, 8 | 13 | 18 | 23) {
            ch == b'-'
        } else {
            ch.is_ascii_hexdigit()
        };
        if !ok {
            return None;
        }
    }
    if b.len() > 36 && (b[36].is_ascii_alphanumeric() || b[36] == b'_') {
        return None;
    }
    Uuid::parse_str(&s[..36]).ok()
}

/// `keyspace.table`, keyspace optional until resolved against `USE`.
#[derive(Debug, Clone, PartialEq)]
pub struct TableName {
    pub keyspace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.keyspace {
            Some(ks) => write!(f, "{ks}.{}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

/// A CQL literal.
#[derive(Debug, Clone, PartialEq)]
pub enum Lit {
    Str(String),
    /// Integer literal, kept as text so any width can be checked later.
    Int(String),
    Float(f64),
    Bool(bool),
    Null,
    Blob(Vec<u8>),
    Uuid(Uuid),
    List(Vec<Lit>),
    Set(Vec<Lit>),
    Map(Vec<(Lit, Lit)>),
}

/// A value position: a literal or a bind marker (index into the markers).
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    Bind(usize),
    Lit(Lit),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Rhs {
    Cmp(Op, Term),
    /// `IN (t1, t2, ...)`
    In(Vec<Term>),
    /// `IN ?` (one marker bound to a list)
    InBind(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub column: String,
    pub rhs: Rhs,
}

/// The right-hand side of a `token(...)` restriction.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenValue {
    /// `token(t1, ...)`: the token of the given partition key values.
    Token(Vec<Term>),
    /// A token (`bigint`) literal or marker.
    Term(Term),
}

/// `token(k1, ...) <op> <value>`
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRelation {
    pub columns: Vec<String>,
    pub op: Op,
    pub value: TokenValue,
}

/// One entry of a selection list.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    Column(String),
    /// `token(k1, ...)`
    Token(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    All,
    /// `COUNT(*)` / `COUNT(1)`, with the output column name.
    Count(String),
    /// `(selector, alias)` pairs.
    Columns(Vec<(Selector, Option<String>)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Select {
    pub table: TableName,
    pub distinct: bool,
    pub selection: Selection,
    pub relations: Vec<Relation>,
    /// `token(...)` restrictions, all of which must hold.
    pub token_relations: Vec<TokenRelation>,
    /// `(column, descending)`
    pub order_by: Vec<(String, bool)>,
    pub limit: Option<Term>,
    pub allow_filtering: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    pub table: TableName,
    pub columns: Vec<String>,
    pub values: Vec<Term>,
    pub if_not_exists: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub table: TableName,
    pub sets: Vec<(String, Term)>,
    pub relations: Vec<Relation>,
    pub if_exists: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delete {
    pub table: TableName,
    pub columns: Vec<String>,
    pub relations: Vec<Relation>,
    pub if_exists: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CreateKeyspace {
    pub name: String,
    pub if_not_exists: bool,
    pub replication: Vec<(String, Lit)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CreateTable {
    pub table: TableName,
    pub if_not_exists: bool,
    pub columns: Vec<(String, ColumnType)>,
    pub partition_key: Vec<String>,
    pub clustering_key: Vec<String>,
}

/// `DROP TABLE [IF EXISTS] [keyspace.]table`
#[derive(Debug, Clone, PartialEq)]
pub struct DropTable {
    pub table: TableName,
    pub if_exists: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    Select(Select),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    CreateKeyspace(CreateKeyspace),
    CreateTable(CreateTable),
    DropTable(DropTable),
    Use(String),
    Truncate(TableName),
}

/// A parsed statement plus its bind markers (`Some(name)` for `:name`).
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub statement: Statement,
    pub markers: Vec<Option<String>>,
}

/// Parses exactly one CQL statement (an optional trailing `;` is allowed).
pub fn parse(input: &str) -> Result<Parsed, ParseError> {
    let toks = lex(input)?;
    let mut p = Parser {
        toks,
        pos: 0,
        markers: Vec::new(),
    };
    let statement = p.statement()?;
    p.eat_sym(";");
    if let Some(tok) = p.peek() {
        return syntax(format!("unexpected '{tok}' after the end of the statement"));
    }
    Ok(Parsed {
        statement,
        markers: p.markers,
    })
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    markers: Vec<Option<String>>,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn peek_at(&self, n: usize) -> Option<&Tok> {
        self.toks.get(self.pos + n)
    }

    fn next(&mut self) -> PResult<Tok> {
        match self.toks.get(self.pos) {
            Some(t) => {
                self.pos += 1;
                Ok(t.clone())
            }
            None => syntax("unexpected end of statement"),
        }
    }

    fn is_kw_at(&self, n: usize, kw: &str) -> bool {
        matches!(self.peek_at(n), Some(Tok::Ident(s)) if s.eq_ignore_ascii_case(kw))
    }

    fn is_kw(&self, kw: &str) -> bool {
        self.is_kw_at(0, kw)
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.is_kw(kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_kw(&mut self, kw: &str) -> PResult<()> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            self.unexpected(&format!("'{}'", kw.to_uppercase()))
        }
    }

    fn is_sym(&self, sym: &str) -> bool {
        matches!(self.peek(), Some(Tok::Sym(s)) if *s == sym)
    }

    fn eat_sym(&mut self, sym: &str) -> bool {
        if self.is_sym(sym) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, sym: &str) -> PResult<()> {
        if self.eat_sym(sym) {
            Ok(())
        } else {
            self.unexpected(&format!("'{sym}'"))
        }
    }

    fn unexpected<T>(&self, expected: &str) -> PResult<T> {
        match self.peek() {
            Some(tok) => syntax(format!("expected {expected} but found '{tok}'")),
            None => syntax(format!("expected {expected} but the statement ended")),
        }
    }

    /// Identifier: unquoted ones are case-insensitive (lower-cased).
    fn ident(&mut self) -> PResult<String> {
        match self.peek() {
            Some(Tok::Ident(s)) => {
                let s = s.to_ascii_lowercase();
                self.pos += 1;
                Ok(s)
            }
            Some(Tok::Quoted(s)) => {
                let s = s.clone();
                self.pos += 1;
                Ok(s)
            }
            _ => self.unexpected("an identifier"),
        }
    }

    fn table_name(&mut self) -> PResult<TableName> {
        let first = self.ident()?;
        if self.eat_sym(".") {
            let name = self.ident()?;
            Ok(TableName {
                keyspace: Some(first),
                name,
            })
        } else {
            Ok(TableName {
                keyspace: None,
                name: first,
            })
        }
    }

    fn statement(&mut self) -> PResult<Statement> {
        let Some(Tok::Ident(word)) = self.peek().cloned() else {
            return self.unexpected("a statement");
        };
        match word.to_ascii_lowercase().as_str() {
            "select" => self.select().map(Statement::Select),
            "insert" => self.insert().map(Statement::Insert),
            "update" => self.update().map(Statement::Update),
            "delete" => self.delete().map(Statement::Delete),
            "use" => {
                self.pos += 1;
                self.ident().map(Statement::Use)
            }
            "truncate" => {
                self.pos += 1;
                self.eat_kw("table");
                self.table_name().map(Statement::Truncate)
            }
            "create" => {
                if self.is_kw_at(1, "keyspace") || self.is_kw_at(1, "schema") {
                    self.create_keyspace().map(Statement::CreateKeyspace)
                } else if self.is_kw_at(1, "table") || self.is_kw_at(1, "columnfamily") {
                    self.create_table().map(Statement::CreateTable)
                } else {
                    unsupported(
                        "cql-server supports only CREATE KEYSPACE and CREATE TABLE \
                         (no types, indexes, views, functions, roles)",
                    )
                }
            }
            "drop" => {
                if self.is_kw_at(1, "table") || self.is_kw_at(1, "columnfamily") {
                    self.drop_table().map(Statement::DropTable)
                } else {
                    let what = match self.peek_at(1) {
                        Some(Tok::Ident(kind)) => format!("DROP {}", kind.to_uppercase()),
                        _ => "this DROP statement".to_owned(),
                    };
                    unsupported(format!(
                        "{what} is not supported by cql-server; only DROP TABLE is"
                    ))
                }
            }
            "alter" => unsupported(
                "ALTER is not supported by cql-server; start a fresh server, \
                 or DROP TABLE and create it again",
            ),
            "begin" | "apply" => unsupported(
                "BEGIN BATCH statements are not supported by cql-server; \
                 use the native BATCH request (the driver's Batch type)",
            ),
            other => unsupported(format!(
                "statement '{}' is not supported by cql-server",
                other.to_uppercase()
            )),
        }
    }

    fn select(&mut self) -> PResult<Select> {
        self.expect_kw("select")?;
        if self.is_kw("json") && !self.is_kw_at(1, "from") && !self.is_sym_at(1, ",") {
            return unsupported("SELECT JSON is not supported by cql-server");
        }
        let distinct =
            self.is_kw("distinct") && !self.is_kw_at(1, "from") && !self.is_sym_at(1, ",");
        if distinct {
            self.pos += 1;
        }
        let selection = self.selection()?;
        self.expect_kw("from")?;
        let table = self.table_name()?;
        let (relations, token_relations) = if self.eat_kw("where") {
            self.where_clause()?
        } else {
            (Vec::new(), Vec::new())
        };
        if self.is_kw("group") {
            return unsupported("GROUP BY is not supported by cql-server");
        }
        let mut order_by = Vec::new();
        if self.eat_kw("order") {
            self.expect_kw("by")?;
            loop {
                let col = self.ident()?;
                let desc = if self.eat_kw("desc") {
                    true
                } else {
                    self.eat_kw("asc");
                    false
                };
                order_by.push((col, desc));
                if !self.eat_sym(",") {
                    break;
                }
            }
        }
        if self.is_kw("per") {
            return unsupported("PER PARTITION LIMIT is not supported by cql-server");
        }
        let limit = if self.eat_kw("limit") {
            Some(self.term()?)
        } else {
            None
        };
        let allow_filtering = if self.eat_kw("allow") {
            self.expect_kw("filtering")?;
            true
        } else {
            false
        };
        if self.eat_kw("bypass") {
            self.expect_kw("cache")?;
        }
        Ok(Select {
            table,
            distinct,
            selection,
            relations,
            token_relations,
            order_by,
            limit,
            allow_filtering,
        })
    }

    fn is_sym_at(&self, n: usize, sym: &str) -> bool {
        matches!(self.peek_at(n), Some(Tok::Sym(s)) if *s == sym)
    }

    fn selection(&mut self) -> PResult<Selection> {
        if self.eat_sym("*") {
            return Ok(Selection::All);
        }
        if self.is_kw("count") && self.is_sym_at(1, "(") {
            self.pos += 2;
            match self.next()? {
                Tok::Sym("*") => {}
                Tok::Int(n) if n == "1" => {}
                other => return syntax(format!("unsupported COUNT argument '{other}'")),
            }
            self.expect_sym(")")?;
            let name = if self.eat_kw("as") {
                self.ident()?
            } else {
                "count".to_owned()
            };
            if self.is_sym(",") {
                return unsupported("COUNT(*) cannot be combined with other selectors");
            }
            return Ok(Selection::Count(name));
        }
        let mut columns = Vec::new();
        loop {
            if self.is_kw("token") && self.is_sym_at(1, "(") {
                self.pos += 1;
                let args = self.ident_list()?;
                let alias = if self.eat_kw("as") {
                    Some(self.ident()?)
                } else {
                    None
                };
                columns.push((Selector::Token(args), alias));
                if !self.eat_sym(",") {
                    break;
                }
                continue;
            }
            let col = self.ident()?;
            if self.is_sym("(") {
                return unsupported(format!(
                    "function '{col}(...)' in a selection is not supported by cql-server"
                ));
            }
            let alias = if self.eat_kw("as") {
                Some(self.ident()?)
            } else {
                None
            };
            columns.push((Selector::Column(col), alias));
            if !self.eat_sym(",") {
                break;
            }
        }
        Ok(Selection::Columns(columns))
    }

    /// `( ident [, ident]* )`
    fn ident_list(&mut self) -> PResult<Vec<String>> {
        self.expect_sym("(")?;
        let mut out = vec![self.ident()?];
        while self.eat_sym(",") {
            out.push(self.ident()?);
        }
        self.expect_sym(")")?;
        Ok(out)
    }

    /// Relations of UPDATE / DELETE: no `token(...)` restrictions.
    fn relations(&mut self) -> PResult<Vec<Relation>> {
        let (relations, token_relations) = self.where_clause()?;
        if !token_relations.is_empty() {
            return syntax("token() restrictions are only allowed in SELECT");
        }
        Ok(relations)
    }

    /// The relations of a WHERE clause, `token(...)` ones separately.
    fn where_clause(&mut self) -> PResult<(Vec<Relation>, Vec<TokenRelation>)> {
        let mut out = Vec::new();
        let mut tokens = Vec::new();
        loop {
            if self.is_sym("(") {
                return unsupported("multi-column relations are not supported by cql-server");
            }
            if self.is_kw("token") && self.is_sym_at(1, "(") {
                tokens.push(self.token_relation()?);
                if !self.eat_kw("and") {
                    break;
                }
                continue;
            }
            let column = self.ident()?;
            let rhs = match self.next()? {
                Tok::Sym("=") => Rhs::Cmp(Op::Eq, self.term()?),
                Tok::Sym("<") => Rhs::Cmp(Op::Lt, self.term()?),
                Tok::Sym(">") => Rhs::Cmp(Op::Gt, self.term()?),
                Tok::Sym("<=") => Rhs::Cmp(Op::Le, self.term()?),
                Tok::Sym(">=") => Rhs::Cmp(Op::Ge, self.term()?),
                Tok::Ident(w) if w.eq_ignore_ascii_case("in") => {
                    if self.eat_sym("(") {
                        let mut terms = Vec::new();
                        if !self.eat_sym(")") {
                            loop {
                                terms.push(self.term()?);
                                if self.eat_sym(")") {
                                    break;
                                }
                                self.expect_sym(",")?;
                            }
                        }
                        Rhs::In(terms)
                    } else {
                        match self.term()? {
                            Term::Bind(i) => Rhs::InBind(i),
                            Term::Lit(_) => {
                                return syntax("IN must be followed by '(' or a marker")
                            }
                        }
                    }
                }
                Tok::Sym("!=") => return unsupported("'!=' is not supported by cql-server"),
                Tok::Ident(w) if w.eq_ignore_ascii_case("contains") => {
                    return unsupported("CONTAINS is not supported by cql-server")
                }
                Tok::Ident(w) if w.eq_ignore_ascii_case("like") => {
                    return unsupported("LIKE is not supported by cql-server")
                }
                other => return syntax(format!("expected an operator but found '{other}'")),
            };
            out.push(Relation { column, rhs });
            if !self.eat_kw("and") {
                break;
            }
        }
        Ok((out, tokens))
    }

    /// `token(k1, ...) <op> token(t1, ...)` or `token(k1, ...) <op> <bigint>`.
    fn token_relation(&mut self) -> PResult<TokenRelation> {
        self.expect_kw("token")?;
        let columns = self.ident_list()?;
        let op = match self.next()? {
            Tok::Sym("=") => Op::Eq,
            Tok::Sym("<") => Op::Lt,
            Tok::Sym(">") => Op::Gt,
            Tok::Sym("<=") => Op::Le,
            Tok::Sym(">=") => Op::Ge,
            Tok::Ident(w) if w.eq_ignore_ascii_case("in") => {
                return unsupported("token(...) IN is not supported by cql-server")
            }
            Tok::Sym("!=") => return unsupported("'!=' is not supported by cql-server"),
            other => return syntax(format!("expected an operator but found '{other}'")),
        };
        let value = if self.is_kw("token") && self.is_sym_at(1, "(") {
            self.pos += 2;
            let mut terms = vec![self.term()?];
            while self.eat_sym(",") {
                terms.push(self.term()?);
            }
            self.expect_sym(")")?;
            TokenValue::Token(terms)
        } else {
            TokenValue::Term(self.term()?)
        };
        Ok(TokenRelation { columns, op, value })
    }

    fn insert(&mut self) -> PResult<Insert> {
        self.expect_kw("insert")?;
        self.expect_kw("into")?;
        let table = self.table_name()?;
        if self.is_kw("json") {
            return unsupported("INSERT JSON is not supported by cql-server");
        }
        self.expect_sym("(")?;
        let mut columns = vec![self.ident()?];
        while self.eat_sym(",") {
            columns.push(self.ident()?);
        }
        self.expect_sym(")")?;
        self.expect_kw("values")?;
        self.expect_sym("(")?;
        let mut values = vec![self.term()?];
        while self.eat_sym(",") {
            values.push(self.term()?);
        }
        self.expect_sym(")")?;
        let if_not_exists = if self.eat_kw("if") {
            self.expect_kw("not")?;
            self.expect_kw("exists")?;
            true
        } else {
            false
        };
        self.reject_using()?;
        Ok(Insert {
            table,
            columns,
            values,
            if_not_exists,
        })
    }

    fn reject_using(&self) -> PResult<()> {
        if self.is_kw("using") {
            return unsupported("USING TTL / USING TIMESTAMP are not supported by cql-server");
        }
        Ok(())
    }

    fn if_exists(&mut self) -> PResult<bool> {
        if self.eat_kw("if") {
            if self.eat_kw("exists") {
                return Ok(true);
            }
            return unsupported("conditional updates other than IF EXISTS are not supported");
        }
        Ok(false)
    }

    fn update(&mut self) -> PResult<Update> {
        self.expect_kw("update")?;
        let table = self.table_name()?;
        self.reject_using()?;
        self.expect_kw("set")?;
        let mut sets = Vec::new();
        loop {
            let col = self.ident()?;
            if self.is_sym("[") || self.is_sym(".") {
                return unsupported("element / field updates are not supported by cql-server");
            }
            self.expect_sym("=")?;
            let literal_word = ["null", "true", "false", "nan", "infinity"]
                .iter()
                .any(|w| self.is_kw(w));
            if matches!(self.peek(), Some(Tok::Ident(_)) | Some(Tok::Quoted(_))) && !literal_word {
                return unsupported(
                    "counter / collection arithmetic (SET c = c + ...) is not supported",
                );
            }
            let term = self.term()?;
            if self.is_sym("+") || self.is_sym("-") {
                return unsupported("collection arithmetic (SET c = ... + c) is not supported");
            }
            sets.push((col, term));
            if !self.eat_sym(",") {
                break;
            }
        }
        self.expect_kw("where")?;
        let relations = self.relations()?;
        let if_exists = self.if_exists()?;
        Ok(Update {
            table,
            sets,
            relations,
            if_exists,
        })
    }

    fn delete(&mut self) -> PResult<Delete> {
        self.expect_kw("delete")?;
        let mut columns = Vec::new();
        if !self.is_kw("from") {
            loop {
                columns.push(self.ident()?);
                if self.is_sym("[") || self.is_sym(".") {
                    return unsupported("element deletions are not supported by cql-server");
                }
                if !self.eat_sym(",") {
                    break;
                }
            }
        }
        self.expect_kw("from")?;
        let table = self.table_name()?;
        self.reject_using()?;
        self.expect_kw("where")?;
        let relations = self.relations()?;
        let if_exists = self.if_exists()?;
        Ok(Delete {
            table,
            columns,
            relations,
            if_exists,
        })
    }

    fn if_not_exists(&mut self) -> PResult<bool> {
        if self.eat_kw("if") {
            self.expect_kw("not")?;
            self.expect_kw("exists")?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn create_keyspace(&mut self) -> PResult<CreateKeyspace> {
        self.expect_kw("create")?;
        if !self.eat_kw("keyspace") {
            self.expect_kw("schema")?;
        }
        let if_not_exists = self.if_not_exists()?;
        let name = self.ident()?;
        let mut replication = Vec::new();
        if self.eat_kw("with") {
            loop {
                let option = self.ident()?;
                self.expect_sym("=")?;
                let value = self.literal()?;
                match (option.as_str(), value) {
                    ("replication", Lit::Map(entries)) => {
                        for (k, v) in entries {
                            let Lit::Str(k) = k else {
                                return syntax("replication keys must be strings");
                            };
                            replication.push((k, v));
                        }
                    }
                    ("replication", _) => return syntax("replication must be a map literal"),
                    ("durable_writes", _) => {}
                    (other, _) => return syntax(format!("unknown keyspace option '{other}'")),
                }
                if !self.eat_kw("and") {
                    break;
                }
            }
        }
        Ok(CreateKeyspace {
            name,
            if_not_exists,
            replication,
        })
    }

    fn drop_table(&mut self) -> PResult<DropTable> {
        self.expect_kw("drop")?;
        if !self.eat_kw("table") {
            self.expect_kw("columnfamily")?;
        }
        let if_exists = self.eat_kw("if");
        if if_exists {
            self.expect_kw("exists")?;
        }
        let table = self.table_name()?;
        Ok(DropTable { table, if_exists })
    }

    fn create_table(&mut self) -> PResult<CreateTable> {
        self.expect_kw("create")?;
        if !self.eat_kw("table") {
            self.expect_kw("columnfamily")?;
        }
        let if_not_exists = self.if_not_exists()?;
        let table = self.table_name()?;
        self.expect_sym("(")?;
        let mut columns: Vec<(String, ColumnType)> = Vec::new();
        let mut key: Option<(Vec<String>, Vec<String>)> = None;
        loop {
            if self.is_kw("primary") && self.is_kw_at(1, "key") {
                self.pos += 2;
                if key.is_some() {
                    return syntax("multiple PRIMARY KEY definitions");
                }
                self.expect_sym("(")?;
                let partition = if self.eat_sym("(") {
                    let mut cols = vec![self.ident()?];
                    while self.eat_sym(",") {
                        cols.push(self.ident()?);
                    }
                    self.expect_sym(")")?;
                    cols
                } else {
                    vec![self.ident()?]
                };
                let mut clustering = Vec::new();
                while self.eat_sym(",") {
                    clustering.push(self.ident()?);
                }
                self.expect_sym(")")?;
                key = Some((partition, clustering));
            } else {
                let name = self.ident()?;
                let ty = self.cql_type()?;
                if self.is_kw("static") {
                    return unsupported("static columns are not supported by cql-server");
                }
                if self.is_kw("primary") {
                    self.pos += 1;
                    self.expect_kw("key")?;
                    if key.is_some() {
                        return syntax("multiple PRIMARY KEY definitions");
                    }
                    key = Some((vec![name.clone()], Vec::new()));
                }
                columns.push((name, ty));
            }
            if self.eat_sym(")") {
                break;
            }
            self.expect_sym(",")?;
        }
        let Some((partition_key, clustering_key)) = key else {
            return syntax("no PRIMARY KEY specified");
        };
        if self.eat_kw("with") {
            loop {
                if self.eat_kw("clustering") {
                    self.expect_kw("order")?;
                    self.expect_kw("by")?;
                    self.expect_sym("(")?;
                    loop {
                        self.ident()?;
                        if self.eat_kw("desc") {
                            return unsupported(
                                "CLUSTERING ORDER BY ... DESC is not supported by cql-server",
                            );
                        }
                        self.eat_kw("asc");
                        if !self.eat_sym(",") {
                            break;
                        }
                    }
                    self.expect_sym(")")?;
                } else if self.eat_kw("compact") {
                    self.expect_kw("storage")?;
                } else {
                    let option = self.ident()?;
                    self.expect_sym("=")?;
                    let value = self.literal()?;
                    if option == "default_time_to_live"
                        && !matches!(&value, Lit::Int(n) if n == "0")
                    {
                        return unsupported("TTLs are not supported by cql-server");
                    }
                }
                if !self.eat_kw("and") {
                    break;
                }
            }
        }
        Ok(CreateTable {
            table,
            if_not_exists,
            columns,
            partition_key,
            clustering_key,
        })
    }

    fn cql_type(&mut self) -> PResult<ColumnType> {
        let name = self.ident()?;
        let ty = match name.as_str() {
            "ascii" => ColumnType::Ascii,
            "bigint" => ColumnType::BigInt,
            "blob" => ColumnType::Blob,
            "boolean" => ColumnType::Boolean,
            "date" => ColumnType::Date,
            "double" => ColumnType::Double,
            "float" => ColumnType::Float,
            "inet" => ColumnType::Inet,
            "int" => ColumnType::Int,
            "smallint" => ColumnType::SmallInt,
            "text" | "varchar" => ColumnType::Text,
            "time" => ColumnType::Time,
            "timestamp" => ColumnType::Timestamp,
            "timeuuid" => ColumnType::Timeuuid,
            "tinyint" => ColumnType::TinyInt,
            "uuid" => ColumnType::Uuid,
            "frozen" => {
                self.expect_sym("<")?;
                let inner = self.cql_type()?;
                self.expect_sym(">")?;
                inner
            }
            "list" | "set" => {
                self.expect_sym("<")?;
                let inner = Box::new(self.cql_type()?);
                self.expect_sym(">")?;
                if name == "list" {
                    ColumnType::List(inner)
                } else {
                    ColumnType::Set(inner)
                }
            }
            "map" => {
                self.expect_sym("<")?;
                let k = Box::new(self.cql_type()?);
                self.expect_sym(",")?;
                let v = Box::new(self.cql_type()?);
                self.expect_sym(">")?;
                ColumnType::Map(k, v)
            }
            "counter" => return unsupported("counter columns are not supported by cql-server"),
            other => {
                return unsupported(format!(
                    "column type '{other}' is not supported by cql-server"
                ))
            }
        };
        Ok(ty)
    }

    fn term(&mut self) -> PResult<Term> {
        if self.eat_sym("?") {
            self.markers.push(None);
            return Ok(Term::Bind(self.markers.len() - 1));
        }
        if self.is_sym(":") {
            self.pos += 1;
            let name = self.ident()?;
            self.markers.push(Some(name));
            return Ok(Term::Bind(self.markers.len() - 1));
        }
        Ok(Term::Lit(self.literal()?))
    }

    fn literal(&mut self) -> PResult<Lit> {
        let tok = self.next()?;
        Ok(match tok {
            Tok::Str(s) => Lit::Str(s),
            Tok::Int(s) => Lit::Int(s),
            Tok::Float(s) => Lit::Float(
                s.parse()
                    .map_err(|_| ParseError::Syntax(format!("invalid float literal '{s}'")))?,
            ),
            Tok::Blob(b) => Lit::Blob(b),
            Tok::Uuid(u) => Lit::Uuid(u),
            Tok::Sym("-") => match self.next()? {
                Tok::Int(s) => Lit::Int(format!("-{s}")),
                Tok::Float(s) => Lit::Float(
                    -s.parse::<f64>()
                        .map_err(|_| ParseError::Syntax(format!("invalid float literal '{s}'")))?,
                ),
                other => return syntax(format!("expected a number after '-' but found '{other}'")),
            },
            Tok::Ident(w) if w.eq_ignore_ascii_case("true") => Lit::Bool(true),
            Tok::Ident(w) if w.eq_ignore_ascii_case("false") => Lit::Bool(false),
            Tok::Ident(w) if w.eq_ignore_ascii_case("null") => Lit::Null,
            Tok::Ident(w) if w.eq_ignore_ascii_case("nan") => Lit::Float(f64::NAN),
            Tok::Ident(w) if w.eq_ignore_ascii_case("infinity") => Lit::Float(f64::INFINITY),
            Tok::Sym("[") => {
                let mut items = Vec::new();
                if !self.eat_sym("]") {
                    loop {
                        items.push(self.literal()?);
                        if self.eat_sym("]") {
                            break;
                        }
                        self.expect_sym(",")?;
                    }
                }
                Lit::List(items)
            }
            Tok::Sym("{") => {
                if self.eat_sym("}") {
                    // `{}` is both an empty set and an empty map.
                    return Ok(Lit::Map(Vec::new()));
                }
                let first = self.literal()?;
                if self.eat_sym(":") {
                    let mut entries = vec![(first, self.literal()?)];
                    while self.eat_sym(",") {
                        let k = self.literal()?;
                        self.expect_sym(":")?;
                        entries.push((k, self.literal()?));
                    }
                    self.expect_sym("}")?;
                    Lit::Map(entries)
                } else {
                    let mut items = vec![first];
                    while self.eat_sym(",") {
                        items.push(self.literal()?);
                    }
                    self.expect_sym("}")?;
                    Lit::Set(items)
                }
            }
            other => return syntax(format!("expected a value but found '{other}'")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(q: &str) -> Parsed {
        match parse(q) {
            Ok(p) => p,
            Err(e) => panic!("{q}: {e:?}"),
        }
    }

    #[test]
    fn markers_only_count_real_binds() {
        let p = ok("SELECT host_id, rpc_address FROM system.local WHERE key='local'");
        assert!(p.markers.is_empty());
        let p = ok("INSERT INTO ks.t (a, b, c) VALUES (?, 'x', :c)");
        assert_eq!(p.markers, vec![None, Some("c".to_owned())]);
    }

    #[test]
    fn strict_about_trailing_input() {
        assert!(matches!(
            parse("SELECT * FROM t WHERE a = 1 garbage"),
            Err(ParseError::Syntax(_))
        ));
        assert!(matches!(
            parse("INSERT INTO t (a) VALUES (1) USING TTL 5"),
            Err(ParseError::Unsupported(_))
        ));
        assert!(matches!(
            parse("ALTER TABLE t ADD c int"),
            Err(ParseError::Unsupported(_))
        ));
    }

    #[test]
    fn drop_table_forms() {
        let p = ok("DROP TABLE t");
        assert_eq!(
            p.statement,
            Statement::DropTable(DropTable {
                table: TableName {
                    keyspace: None,
                    name: "t".into()
                },
                if_exists: false,
            })
        );
        let p = ok("drop table if exists Ks.\"T\";");
        assert_eq!(
            p.statement,
            Statement::DropTable(DropTable {
                table: TableName {
                    keyspace: Some("ks".into()),
                    name: "T".into()
                },
                if_exists: true,
            })
        );
        assert!(matches!(
            ok("DROP COLUMNFAMILY ks.t").statement,
            Statement::DropTable(DropTable {
                if_exists: false,
                ..
            })
        ));
        assert!(p.markers.is_empty());
        for q in [
            "DROP TABLE",
            "DROP TABLE IF t",
            "DROP TABLE IF EXISTS",
            "DROP TABLE t x",
        ] {
            assert!(matches!(parse(q), Err(ParseError::Syntax(_))), "{q}");
        }
        for q in [
            "DROP KEYSPACE ks",
            "DROP KEYSPACE IF EXISTS ks",
            "DROP INDEX i",
            "DROP TYPE ty",
            "DROP MATERIALIZED VIEW v",
            "DROP",
        ] {
            assert!(matches!(parse(q), Err(ParseError::Unsupported(_))), "{q}");
        }
        assert_eq!(
            parse("drop keyspace ks"),
            Err(ParseError::Unsupported(
                "DROP KEYSPACE is not supported by cql-server; only DROP TABLE is".into()
            ))
        );
    }

    #[test]
    fn literals() {
        let p = ok("insert into T (a,b,c,d,e) values ('it''s', -5, 0xCAFE, 6ab09bec-e68e-48d9-a5f8-97e6fb4c9b47, {'k': [1, 2]});");
        let Statement::Insert(ins) = p.statement else {
            panic!()
        };
        assert_eq!(ins.table.name, "t");
        assert_eq!(ins.values[0], Term::Lit(Lit::Str("it's".into())));
        assert_eq!(ins.values[1], Term::Lit(Lit::Int("-5".into())));
        assert_eq!(ins.values[2], Term::Lit(Lit::Blob(vec![0xca, 0xfe])));
        assert!(matches!(ins.values[3], Term::Lit(Lit::Uuid(_))));
    }

    #[test]
    fn create_table_forms() {
        let p = ok("CREATE TABLE IF NOT EXISTS msghash.messages_g2 (digest blob PRIMARY KEY, message text)");
        let Statement::CreateTable(ct) = p.statement else {
            panic!()
        };
        assert_eq!(ct.partition_key, vec!["digest"]);
        let p = ok("create table t (a int, b text, c bigint, d map<text, frozen<list<int>>>, primary key ((a, b), c)) with clustering order by (c asc) and comment = 'x'");
        let Statement::CreateTable(ct) = p.statement else {
            panic!()
        };
        assert_eq!(ct.partition_key, vec!["a", "b"]);
        assert_eq!(ct.clustering_key, vec!["c"]);
    }

    #[test]
    fn select_forms() {
        let p = ok("SELECT a AS x, \"B\" FROM ks.t WHERE k IN ? AND c >= 3 ORDER BY c ASC LIMIT ? ALLOW FILTERING");
        let Statement::Select(s) = p.statement else {
            panic!()
        };
        assert_eq!(p.markers.len(), 2);
        assert_eq!(
            s.selection,
            Selection::Columns(vec![
                (Selector::Column("a".into()), Some("x".into())),
                (Selector::Column("B".into()), None)
            ])
        );
        assert!(s.allow_filtering);
        assert!(matches!(s.relations[0].rhs, Rhs::InBind(0)));
        assert!(matches!(
            ok("select count(*) from t").statement,
            Statement::Select(_)
        ));
    }

    #[test]
    fn token_forms() {
        let p = ok("SELECT token(digest), digest AS d FROM ks.messages WHERE token(digest) > token(?) AND TOKEN(digest) <= -5 LIMIT ?");
        let Statement::Select(s) = p.statement else {
            panic!()
        };
        assert_eq!(p.markers.len(), 2);
        assert_eq!(
            s.selection,
            Selection::Columns(vec![
                (Selector::Token(vec!["digest".into()]), None),
                (Selector::Column("digest".into()), Some("d".into())),
            ])
        );
        assert!(s.relations.is_empty());
        assert_eq!(
            s.token_relations,
            vec![
                TokenRelation {
                    columns: vec!["digest".into()],
                    op: Op::Gt,
                    value: TokenValue::Token(vec![Term::Bind(0)]),
                },
                TokenRelation {
                    columns: vec!["digest".into()],
                    op: Op::Le,
                    value: TokenValue::Term(Term::Lit(Lit::Int("-5".into()))),
                },
            ]
        );
        let p = ok("select * from t where token(a, b) >= token(1, :b) and c = 3 allow filtering");
        let Statement::Select(s) = p.statement else {
            panic!()
        };
        assert_eq!(p.markers, vec![Some("b".to_owned())]);
        assert_eq!(s.token_relations[0].columns, vec!["a", "b"]);
        assert_eq!(s.relations.len(), 1);
        // A column called "token" is still a column.
        ok("select token from t where token = 1");
        assert!(parse("DELETE FROM t WHERE token(k) > 5").is_err());
        assert!(matches!(
            parse("SELECT * FROM t WHERE token(k) IN (1, 2)"),
            Err(ParseError::Unsupported(_))
        ));
    }
}

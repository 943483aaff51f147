//! The `q` search grammar of files.list ("Search for files and folders"): parse, then match.
//!
//! Supported terms: `'ID' in parents`, `'x' in owners|writers|readers` (one user: always true
//! for 'me' / the user), `name`, `mimeType`, `fullText` with `=`, `!=`, `contains`;
//! `trashed`/`starred` with `=`/`!=` and `true`/`false`; `createdTime`/`modifiedTime` with
//! `<`, `<=`, `=`, `!=`, `>`, `>=` and an RFC 3339 string; `appProperties has { key='k' and
//! value='v' }` and `properties has {...}`; `and`, `or`, `not`, parentheses. Strings are
//! single-quoted; `\'` and `\\` are the escapes. Anything else answers 400 "Invalid Value".

use crate::error::ApiError;
use crate::store::FileRec;
use crate::util::parse_rfc3339;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Str(String),
    Word(String),
    Op(&'static str),
    LParen,
    RParen,
    LBrace,
    RBrace,
}

fn lex(q: &str) -> Option<Vec<Tok>> {
    let c: Vec<char> = q.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '\'' || ch == '"' {
            // Drive's guide quotes with single quotes; double quotes are accepted by Drive too.
            let quote = ch;
            i += 1;
            let mut s = String::new();
            loop {
                let x = *c.get(i)?;
                if x == '\\' {
                    let n = *c.get(i + 1)?;
                    if n != '\'' && n != '\\' && n != '"' {
                        return None;
                    }
                    s.push(n);
                    i += 2;
                } else if x == quote {
                    i += 1;
                    break;
                } else {
                    s.push(x);
                    i += 1;
                }
            }
            out.push(Tok::Str(s));
        } else if ch == '(' {
            out.push(Tok::LParen);
            i += 1;
        } else if ch == ')' {
            out.push(Tok::RParen);
            i += 1;
        } else if ch == '{' {
            out.push(Tok::LBrace);
            i += 1;
        } else if ch == '}' {
            out.push(Tok::RBrace);
            i += 1;
        } else if "=!<>".contains(ch) {
            let two: String = c[i..(i + 2).min(c.len())].iter().collect();
            let op = match two.as_str() {
                "!=" => "!=",
                "<=" => "<=",
                ">=" => ">=",
                _ => match ch {
                    '=' => "=",
                    '<' => "<",
                    '>' => ">",
                    _ => return None,
                },
            };
            i += op.len();
            out.push(Tok::Op(op));
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_' || c[i] == '.') {
                i += 1;
            }
            out.push(Tok::Word(c[start..i].iter().collect()));
        } else {
            return None;
        }
    }
    Some(out)
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    InParents(String),
    /// `'x' in owners/writers/readers`: the emulator has one user who owns everything.
    InPeople,
    Text {
        field: TextField,
        op: &'static str,
        value: String,
    },
    Flag {
        field: FlagField,
        want: bool,
    },
    Time {
        field: TimeField,
        op: &'static str,
        ms: i64,
    },
    PropHas {
        app: bool,
        key: String,
        value: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum TextField {
    Name,
    MimeType,
    FullText,
}
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum FlagField {
    Trashed,
    Starred,
}
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum TimeField {
    Created,
    Modified,
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn is_word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(x)) if x.eq_ignore_ascii_case(w))
    }
    fn expect_word(&mut self, w: &str) -> Option<()> {
        match self.next()? {
            Tok::Word(x) if x.eq_ignore_ascii_case(w) => Some(()),
            _ => None,
        }
    }
    fn string(&mut self) -> Option<String> {
        match self.next()? {
            Tok::Str(s) => Some(s),
            _ => None,
        }
    }

    fn or(&mut self) -> Option<Expr> {
        let mut e = self.and()?;
        while self.is_word("or") {
            self.pos += 1;
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Some(e)
    }
    fn and(&mut self) -> Option<Expr> {
        let mut e = self.not()?;
        while self.is_word("and") {
            self.pos += 1;
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Some(e)
    }
    fn not(&mut self) -> Option<Expr> {
        if self.is_word("not") {
            self.pos += 1;
            return Some(Expr::Not(Box::new(self.not()?)));
        }
        self.primary()
    }
    fn primary(&mut self) -> Option<Expr> {
        match self.next()? {
            Tok::LParen => {
                let e = self.or()?;
                (self.next()? == Tok::RParen).then_some(e)
            }
            Tok::Str(s) => {
                self.expect_word("in")?;
                match self.next()? {
                    Tok::Word(w) if w == "parents" => Some(Expr::InParents(s)),
                    Tok::Word(w) if w == "owners" || w == "writers" || w == "readers" => Some(Expr::InPeople),
                    _ => None,
                }
            }
            Tok::Word(field) => self.term(&field),
            _ => None,
        }
    }
    fn term(&mut self, field: &str) -> Option<Expr> {
        match field {
            "name" | "mimeType" | "fullText" => {
                let f = match field {
                    "name" => TextField::Name,
                    "mimeType" => TextField::MimeType,
                    _ => TextField::FullText,
                };
                let op = match self.next()? {
                    Tok::Op(o @ ("=" | "!=")) if f != TextField::FullText => o,
                    Tok::Word(w) if w == "contains" => "contains",
                    _ => return None,
                };
                Some(Expr::Text { field: f, op, value: self.string()? })
            }
            "trashed" | "starred" => {
                let f = if field == "trashed" { FlagField::Trashed } else { FlagField::Starred };
                let op = match self.next()? {
                    Tok::Op(o @ ("=" | "!=")) => o,
                    _ => return None,
                };
                let v = match self.next()? {
                    Tok::Word(w) if w == "true" => true,
                    Tok::Word(w) if w == "false" => false,
                    _ => return None,
                };
                Some(Expr::Flag { field: f, want: if op == "=" { v } else { !v } })
            }
            "createdTime" | "modifiedTime" => {
                let f = if field == "createdTime" { TimeField::Created } else { TimeField::Modified };
                let op = match self.next()? {
                    Tok::Op(o) => o,
                    _ => return None,
                };
                let ms = parse_rfc3339(&self.string()?)?;
                Some(Expr::Time { field: f, op, ms })
            }
            "appProperties" | "properties" => {
                self.expect_word("has")?;
                if self.next()? != Tok::LBrace {
                    return None;
                }
                self.expect_word("key")?;
                if self.next()? != Tok::Op("=") {
                    return None;
                }
                let key = self.string()?;
                self.expect_word("and")?;
                self.expect_word("value")?;
                if self.next()? != Tok::Op("=") {
                    return None;
                }
                let value = self.string()?;
                if self.next()? != Tok::RBrace {
                    return None;
                }
                Some(Expr::PropHas { app: field == "appProperties", key, value })
            }
            _ => None,
        }
    }
}

/// Parses a `q` value; errors are Drive's 400 "Invalid Value" on parameter `q`.
pub(crate) fn parse(q: &str) -> Result<Expr, ApiError> {
    let toks = lex(q).ok_or_else(|| ApiError::invalid_param("q"))?;
    let mut p = Parser { toks, pos: 0 };
    let e = p.or().ok_or_else(|| ApiError::invalid_param("q"))?;
    if p.pos != p.toks.len() {
        return Err(ApiError::invalid_param("q"));
    }
    Ok(e)
}

/// Drive's `name contains` is a prefix match on the name and on each word of it
/// ("HelloWorld" matches 'Hello' but not 'World'), case-insensitively.
fn name_contains(name: &str, needle: &str) -> bool {
    let n = needle.to_lowercase();
    let name = name.to_lowercase();
    name.starts_with(&n) || name.split(|c: char| !c.is_alphanumeric()).any(|w| !w.is_empty() && w.starts_with(&n))
}

/// Evaluates `e` against one file. `root` resolves the `'root'` alias.
pub(crate) fn matches(e: &Expr, f: &FileRec, root: &str) -> bool {
    match e {
        Expr::And(a, b) => matches(a, f, root) && matches(b, f, root),
        Expr::Or(a, b) => matches(a, f, root) || matches(b, f, root),
        Expr::Not(a) => !matches(a, f, root),
        Expr::InParents(p) => {
            let p = if p == "root" { root } else { p.as_str() };
            f.parents.iter().any(|x| x == p)
        }
        Expr::InPeople => true,
        Expr::Text { field, op, value } => {
            let hay = match field {
                TextField::Name => &f.name,
                TextField::MimeType => &f.mime_type,
                TextField::FullText => &f.name,
            };
            match (*op, field) {
                // Drive compares names without regard to case (`name =
                // 'VMs'` finds `vms` too), so clients check the names
                // listed; rclone does, "since the `=` operator is case
                // insensitive".
                ("=", TextField::Name) => hay.to_lowercase() == value.to_lowercase(),
                ("!=", TextField::Name) => hay.to_lowercase() != value.to_lowercase(),
                ("=", _) => hay == value,
                ("!=", _) => hay != value,
                (_, TextField::Name) => name_contains(hay, value),
                (_, TextField::FullText) => {
                    let v = value.to_lowercase();
                    hay.to_lowercase().contains(&v)
                        || f.description.as_deref().is_some_and(|d| d.to_lowercase().contains(&v))
                }
                _ => hay.contains(value.as_str()),
            }
        }
        Expr::Flag { field, want } => match field {
            FlagField::Trashed => f.trashed == *want,
            FlagField::Starred => f.starred == *want,
        },
        Expr::Time { field, op, ms } => {
            let t = match field {
                TimeField::Created => f.created_ms,
                TimeField::Modified => f.modified_ms,
            };
            match *op {
                "<" => t < *ms,
                "<=" => t <= *ms,
                "=" => t == *ms,
                "!=" => t != *ms,
                ">" => t > *ms,
                ">=" => t >= *ms,
                _ => false,
            }
        }
        Expr::PropHas { app, key, value } => {
            let m = if *app { &f.app_properties } else { &f.properties };
            m.get(key) == Some(value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_backend_queries() {
        let e = parse(r"'abc' in parents and trashed = false and name = 'it\'s a \\ test'").unwrap();
        let s = format!("{e:?}");
        assert!(s.contains(r"it's a \\ test"), "{s}");
        parse("appProperties has { key='k' and value='v' } and not (mimeType = 'x' or name contains 'y')").unwrap();
        parse("modifiedTime > '2012-06-04T12:00:00' and 'me' in owners").unwrap();
        for bad in [
            "name = 'x",
            "name == 'x'",
            "name = x",
            "size > 3",
            "(name = 'a'",
            "name = 'a' and",
            r"name = 'a\n'",
            "trashed = maybe",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn contains_is_prefix_per_word() {
        assert!(name_contains("HelloWorld", "Hello"));
        assert!(!name_contains("HelloWorld", "World"));
        assert!(name_contains("pack 0001.bin", "0001"));
    }
}

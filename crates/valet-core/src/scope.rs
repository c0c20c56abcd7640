//! Scopes (`blob:write`) and sets of them, parsed strictly.
//!
//! A scope is one of ten values: five resources times two kinds of access.
//! `write` never implies `read`. A [`ScopeSet`] is a bitset, so it is `Copy`
//! and comparing or intersecting two sets costs one instruction.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a scope protects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Val,
    User,
    Blob,
    Sqlite,
    Email,
}

impl Resource {
    pub const ALL: [Resource; 5] = [
        Resource::Val,
        Resource::User,
        Resource::Blob,
        Resource::Sqlite,
        Resource::Email,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Val => "val",
            Resource::User => "user",
            Resource::Blob => "blob",
            Resource::Sqlite => "sqlite",
            Resource::Email => "email",
        }
    }

    fn parse(s: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// How a scope lets its holder touch the resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }

    fn parse(s: &str) -> Option<Access> {
        match s {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            _ => None,
        }
    }
}

/// One permission: a resource and an access, written `resource:access`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    pub resource: Resource,
    pub access: Access,
}

impl Scope {
    pub const fn new(resource: Resource, access: Access) -> Scope {
        Scope { resource, access }
    }

    pub const VAL_READ: Scope = Scope::new(Resource::Val, Access::Read);
    pub const VAL_WRITE: Scope = Scope::new(Resource::Val, Access::Write);
    pub const USER_READ: Scope = Scope::new(Resource::User, Access::Read);
    pub const USER_WRITE: Scope = Scope::new(Resource::User, Access::Write);
    pub const BLOB_READ: Scope = Scope::new(Resource::Blob, Access::Read);
    pub const BLOB_WRITE: Scope = Scope::new(Resource::Blob, Access::Write);
    pub const SQLITE_READ: Scope = Scope::new(Resource::Sqlite, Access::Read);
    pub const SQLITE_WRITE: Scope = Scope::new(Resource::Sqlite, Access::Write);
    pub const EMAIL_READ: Scope = Scope::new(Resource::Email, Access::Read);
    pub const EMAIL_WRITE: Scope = Scope::new(Resource::Email, Access::Write);

    /// Every scope, in a fixed order (resource, then read before write).
    pub const ALL: [Scope; 10] = [
        Scope::VAL_READ,
        Scope::VAL_WRITE,
        Scope::USER_READ,
        Scope::USER_WRITE,
        Scope::BLOB_READ,
        Scope::BLOB_WRITE,
        Scope::SQLITE_READ,
        Scope::SQLITE_WRITE,
        Scope::EMAIL_READ,
        Scope::EMAIL_WRITE,
    ];

    fn bit(self) -> u16 {
        let resource = self.resource as u16;
        let access = self.access as u16;
        1 << (resource * 2 + access)
    }

    /// The scopes a careful owner should think twice about handing out:
    /// both let code change what code runs or who may run it.
    pub fn is_risky(self) -> bool {
        self == Scope::VAL_WRITE || self == Scope::USER_WRITE
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.resource.as_str(), self.access.as_str())
    }
}

/// A scope string that is not one of the ten scopes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("invalid scope '{0}': expected resource:access, e.g. blob:read")]
    Malformed(String),
    #[error(
        "invalid scope '{scope}': unknown resource '{resource}' (one of val, user, blob, sqlite, email)"
    )]
    UnknownResource { scope: String, resource: String },
    #[error("invalid scope '{scope}': unknown access '{access}' (read or write)")]
    UnknownAccess { scope: String, access: String },
}

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Scope, ScopeError> {
        let mut parts = s.split(':');
        let (Some(resource), Some(access), None) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(ScopeError::Malformed(s.to_owned()));
        };
        if resource.is_empty() || access.is_empty() {
            return Err(ScopeError::Malformed(s.to_owned()));
        }
        let resource_value =
            Resource::parse(resource).ok_or_else(|| ScopeError::UnknownResource {
                scope: s.to_owned(),
                resource: resource.to_owned(),
            })?;
        let access_value = Access::parse(access).ok_or_else(|| ScopeError::UnknownAccess {
            scope: s.to_owned(),
            access: access.to_owned(),
        })?;
        Ok(Scope::new(resource_value, access_value))
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Scope, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A set of scopes. The empty set means "nothing", never "everything".
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ScopeSet(u16);

impl ScopeSet {
    pub const EMPTY: ScopeSet = ScopeSet(0);

    /// Every scope.
    pub fn all() -> ScopeSet {
        Scope::ALL.into_iter().collect()
    }

    /// What a val's runs get unless its owner says otherwise: everything but
    /// the two scopes that let code change code or credentials.
    pub fn default_val() -> ScopeSet {
        ScopeSet::all()
            .without(Scope::VAL_WRITE)
            .without(Scope::USER_WRITE)
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn with(self, scope: Scope) -> ScopeSet {
        ScopeSet(self.0 | scope.bit())
    }

    pub fn without(self, scope: Scope) -> ScopeSet {
        ScopeSet(self.0 & !scope.bit())
    }

    pub fn is_subset(self, of: ScopeSet) -> bool {
        self.0 & !of.0 == 0
    }

    pub fn intersect(self, other: ScopeSet) -> ScopeSet {
        ScopeSet(self.0 & other.0)
    }

    pub fn union(self, other: ScopeSet) -> ScopeSet {
        ScopeSet(self.0 | other.0)
    }

    /// The scopes in `self` that `other` lacks.
    pub fn minus(self, other: ScopeSet) -> ScopeSet {
        ScopeSet(self.0 & !other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    /// Parses a list separated by spaces and/or commas. Any bad entry fails
    /// the whole list; nothing is silently dropped.
    pub fn parse(list: &str) -> Result<ScopeSet, ScopeError> {
        list.split([' ', ',', '\t', '\n'])
            .filter(|s| !s.is_empty())
            .map(str::parse::<Scope>)
            .collect()
    }

    /// The canonical form: space-separated, in [`Scope::ALL`] order. This is
    /// the `scope` claim of a run token and the column format in the store.
    pub fn to_claim(self) -> String {
        // Made for every run (its key, its record): no string per scope.
        let mut claim = String::with_capacity(128);
        for scope in self.iter() {
            if !claim.is_empty() {
                claim.push(' ');
            }
            claim.push_str(scope.resource.as_str());
            claim.push(':');
            claim.push_str(scope.access.as_str());
        }
        claim
    }

    pub fn to_strings(self) -> Vec<String> {
        self.iter().map(|s| s.to_string()).collect()
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> ScopeSet {
        iter.into_iter().fold(ScopeSet::EMPTY, ScopeSet::with)
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScopeSet[{}]", self.to_claim())
    }
}

impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_claim())
    }
}

impl Serialize for ScopeSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for ScopeSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ScopeSet, D::Error> {
        let scopes = Vec::<Scope>::deserialize(deserializer)?;
        Ok(scopes.into_iter().collect())
    }
}

/// The scopes an API token carries. Tokens made before scopes existed carry
/// no list and mean "everything" until the migration rewrites them; that is
/// a different variant, never an empty set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenScopes {
    Legacy,
    Scoped(ScopeSet),
}

impl TokenScopes {
    /// What the token may actually do.
    pub fn effective(self) -> ScopeSet {
        match self {
            TokenScopes::Legacy => ScopeSet::all(),
            TokenScopes::Scoped(set) => set,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scope_round_trips() {
        for scope in Scope::ALL {
            let text = scope.to_string();
            assert_eq!(text.parse::<Scope>(), Ok(scope), "{text}");
        }
        assert_eq!(Scope::ALL.len(), 10);
        assert_eq!(ScopeSet::all().len(), 10);
    }

    #[test]
    fn malformed_scopes_are_rejected_naming_the_bad_part() {
        let cases = [
            ("blob", "'blob'"),
            ("blob:", "'blob:'"),
            ("blob:delete", "unknown access 'delete'"),
            ("BLOB:READ", "unknown resource 'BLOB'"),
            ("a:b:c", "'a:b:c'"),
            ("", "''"),
            (":read", "':read'"),
            ("files:read", "unknown resource 'files'"),
        ];
        for (input, needle) in cases {
            let err = input.parse::<Scope>().expect_err(input).to_string();
            assert!(err.contains(needle), "{input:?} gave {err:?}");
        }
    }

    #[test]
    fn lists_parse_with_spaces_or_commas_and_fail_whole() {
        let set = ScopeSet::parse("blob:read, blob:write sqlite:read").expect("valid list");
        assert_eq!(set.to_claim(), "blob:read blob:write sqlite:read");
        assert_eq!(ScopeSet::parse("").expect("empty"), ScopeSet::EMPTY);
        let err = ScopeSet::parse("blob:read blob:delete").expect_err("bad entry");
        assert!(err.to_string().contains("blob:delete"));
    }

    #[test]
    fn defaults_are_everything_but_the_two_risky_scopes() {
        let defaults = ScopeSet::default_val();
        assert_eq!(defaults.len(), 8);
        assert!(!defaults.contains(Scope::VAL_WRITE));
        assert!(!defaults.contains(Scope::USER_WRITE));
        assert!(defaults.contains(Scope::VAL_READ));
        assert!(Scope::ALL.iter().filter(|s| s.is_risky()).count() == 2);
    }

    #[test]
    fn write_does_not_imply_read() {
        let set = ScopeSet::EMPTY.with(Scope::BLOB_WRITE);
        assert!(!set.contains(Scope::BLOB_READ));
    }

    #[test]
    fn set_algebra() {
        let a = ScopeSet::parse("blob:read blob:write").expect("a");
        let b = ScopeSet::parse("blob:read email:write").expect("b");
        assert_eq!(a.intersect(b).to_claim(), "blob:read");
        assert!(a.intersect(b).is_subset(a));
        assert!(!a.is_subset(b));
        assert_eq!(a.minus(b).to_claim(), "blob:write");
        assert!(ScopeSet::EMPTY.is_subset(a));
    }

    #[test]
    fn json_is_an_array_of_strings_and_strict() {
        let set = ScopeSet::parse("val:read email:write").expect("set");
        let json = serde_json::to_string(&set).expect("json");
        assert_eq!(json, r#"["val:read","email:write"]"#);
        let back: ScopeSet = serde_json::from_str(&json).expect("back");
        assert_eq!(back, set);
        let bad = serde_json::from_str::<ScopeSet>(r#"["val:read","val:delete"]"#);
        assert!(bad.expect_err("strict").to_string().contains("val:delete"));
    }

    #[test]
    fn legacy_is_not_an_empty_list() {
        assert_eq!(TokenScopes::Legacy.effective(), ScopeSet::all());
        assert_eq!(
            TokenScopes::Scoped(ScopeSet::EMPTY).effective(),
            ScopeSet::EMPTY
        );
    }
}

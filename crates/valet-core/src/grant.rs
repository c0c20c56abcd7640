//! Proof types: a [`Granted<S>`] says that the data of one user may be
//! touched with scope `S`, and a [`GrantedSet`] that a principal holds every
//! scope of a set (what it may hand on to a val's runs).
//!
//! valet-store's tenant calls take these instead of a bare user id, so a
//! blob write cannot be made with a read grant and a handler that forgot
//! its scope check does not compile (the same idea as Deno's `CheckedPath`).
//! A proof is made in one of two ways, both easy to find in review:
//! [`Granted::check`], the scope check itself (valet-api calls it only in
//! `Caller::require*`, which also audits), and [`Granted::for_operator`], for
//! work that acts without a request: the CLI, the migration, mail valet
//! sends to an owner, tests.

use std::fmt;
use std::marker::PhantomData;

use crate::scope::{Scope, ScopeSet};

/// A scope known at compile time, for [`Granted`].
pub trait ScopeKind: Send + Sync + 'static {
    const SCOPE: Scope;
}

/// The val scopes: reading a val is allowed to a holder of either (a write
/// answers with the val it wrote).
pub trait ValScope: ScopeKind {}

/// The user scopes: as for vals, a token change answers with the token.
pub trait UserScope: ScopeKind {}

macro_rules! scope_kinds {
    ($($(#[$doc:meta])* $name:ident = $scope:expr;)*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy, PartialEq, Eq)]
            pub struct $name;
            impl ScopeKind for $name {
                const SCOPE: Scope = $scope;
            }
        )*
    };
}

scope_kinds! {
    /// `val:read`
    ValRead = Scope::VAL_READ;
    /// `val:write`
    ValWrite = Scope::VAL_WRITE;
    /// `user:read`
    UserRead = Scope::USER_READ;
    /// `user:write`
    UserWrite = Scope::USER_WRITE;
    /// `blob:read`
    BlobRead = Scope::BLOB_READ;
    /// `blob:write`
    BlobWrite = Scope::BLOB_WRITE;
    /// `sqlite:read`
    SqliteRead = Scope::SQLITE_READ;
    /// `sqlite:write`
    SqliteWrite = Scope::SQLITE_WRITE;
    /// `email:read`
    EmailRead = Scope::EMAIL_READ;
    /// `email:write`
    EmailWrite = Scope::EMAIL_WRITE;
}

impl ValScope for ValRead {}
impl ValScope for ValWrite {}
impl UserScope for UserRead {}
impl UserScope for UserWrite {}

/// Proof that the data of `user_id` may be used with scope `S`.
pub struct Granted<S> {
    user_id: String,
    /// `fn() -> S` keeps the proof `Send + Sync` whatever `S` is.
    scope: PhantomData<fn() -> S>,
}

impl<S: ScopeKind> Granted<S> {
    /// The scope check: a proof when `held` (the scopes of a principal
    /// acting for `user_id`) contains `S`.
    pub fn check(user_id: &str, held: ScopeSet) -> Option<Granted<S>> {
        held.contains(S::SCOPE).then(|| Granted {
            user_id: user_id.to_owned(),
            scope: PhantomData,
        })
    }

    /// For work that acts on a user's data without a request: the CLI, the
    /// migration, mail valet sends to an owner, tests. Named so that it
    /// stands out in review; valet-api's clippy.toml forbids it there.
    pub fn for_operator(user_id: &str) -> Granted<S> {
        Granted {
            user_id: user_id.to_owned(),
            scope: PhantomData,
        }
    }

    /// Whose data this proof opens.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    pub fn scope(&self) -> Scope {
        S::SCOPE
    }
}

impl<S> Clone for Granted<S> {
    fn clone(&self) -> Granted<S> {
        Granted {
            user_id: self.user_id.clone(),
            scope: PhantomData,
        }
    }
}

impl<S: ScopeKind> fmt::Debug for Granted<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Granted({}, {})", S::SCOPE, self.user_id)
    }
}

/// Proof that a principal acting for `user_id` holds every scope of a set:
/// what a change that hands power on (a val's scopes, its code) needs.
#[derive(Clone, PartialEq, Eq)]
pub struct GrantedSet {
    user_id: String,
    scopes: ScopeSet,
}

impl GrantedSet {
    /// The check: a proof for `wanted` when `held` covers it, else the
    /// first scope missing.
    pub fn check(user_id: &str, wanted: ScopeSet, held: ScopeSet) -> Result<GrantedSet, Scope> {
        match wanted.minus(held).iter().next() {
            Some(missing) => Err(missing),
            None => Ok(GrantedSet {
                user_id: user_id.to_owned(),
                scopes: wanted,
            }),
        }
    }

    /// As [`Granted::for_operator`]: work without a request (CLI, tests).
    pub fn for_operator(user_id: &str, scopes: ScopeSet) -> GrantedSet {
        GrantedSet {
            user_id: user_id.to_owned(),
            scopes,
        }
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    pub fn scopes(&self) -> ScopeSet {
        self.scopes
    }

    /// Whether this proof covers every scope of `set`.
    pub fn covers(&self, set: ScopeSet) -> bool {
        set.is_subset(self.scopes)
    }
}

impl fmt::Debug for GrantedSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GrantedSet({:?}, {})", self.scopes, self.user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_grants_only_a_held_scope() {
        let held = ScopeSet::parse("blob:read sqlite:write").expect("set");
        let read = Granted::<BlobRead>::check("usr_1", held).expect("blob:read is held");
        assert_eq!(read.user_id(), "usr_1");
        assert_eq!(read.scope(), Scope::BLOB_READ);
        assert!(Granted::<BlobWrite>::check("usr_1", held).is_none());
        assert!(Granted::<SqliteRead>::check("usr_1", held).is_none());
        assert!(Granted::<SqliteWrite>::check("usr_1", held).is_some());
        assert!(Granted::<ValWrite>::check("usr_1", ScopeSet::EMPTY).is_none());
    }

    #[test]
    fn a_set_check_names_the_first_missing_scope() {
        let held = ScopeSet::parse("blob:read blob:write").expect("set");
        let wanted = ScopeSet::parse("blob:read email:write").expect("set");
        assert_eq!(
            GrantedSet::check("u", wanted, held),
            Err(Scope::EMAIL_WRITE)
        );
        let proof = GrantedSet::check("u", ScopeSet::parse("blob:read").expect("set"), held)
            .expect("covered");
        assert!(proof.covers(ScopeSet::parse("blob:read").expect("set")));
        assert!(!proof.covers(held));
    }
}

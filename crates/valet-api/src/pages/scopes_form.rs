//! The scope control: per resource None / Read / Read and write, with the
//! safe defaults marked and the risky scopes flagged.

use maud::{Markup, html};
use valet_core::{Access, Resource, Scope, ScopeSet};

fn level(set: ScopeSet, resource: Resource) -> &'static str {
    let read = set.contains(Scope::new(resource, Access::Read));
    let write = set.contains(Scope::new(resource, Access::Write));
    match (read, write) {
        (false, false) => "none",
        (true, false) => "read",
        (true, true) => "write",
        (false, true) => "writeonly",
    }
}

/// Radio groups named `scope_<resource>`.
pub fn control(current: ScopeSet) -> Markup {
    let defaults = ScopeSet::default_val();
    html! {
        @for resource in Resource::ALL {
            @let now = level(current, resource);
            @let default = level(defaults, resource);
            fieldset {
                legend { (resource.as_str()) }
                @for (value, text) in [("none", "None"), ("read", "Read"), ("write", "Read and write")] {
                    label {
                        input type="radio" name=(format!("scope_{}", resource.as_str())) value=(value) checked[now == value];
                        " " (text)
                        @if value == default { span.muted { " (default)" } }
                        @if value == "write" && Scope::new(resource, Access::Write).is_risky() {
                            span.risky title="lets code change code or credentials" { " ⚠ risky" }
                        }
                    }
                }
                @if now == "writeonly" {
                    label { input type="radio" name=(format!("scope_{}", resource.as_str())) value="writeonly" checked; " Write only" }
                }
            }
        }
    }
}

/// Reads the radio groups back; a missing group means None.
pub fn parse(fields: &[(String, String)]) -> Result<ScopeSet, String> {
    let mut set = ScopeSet::EMPTY;
    for resource in Resource::ALL {
        let name = format!("scope_{}", resource.as_str());
        let value = fields
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("none");
        let (read, write) = match value {
            "none" => (false, false),
            "read" => (true, false),
            "write" => (true, true),
            "writeonly" => (false, true),
            other => {
                return Err(format!(
                    "invalid choice '{other}' for {}",
                    resource.as_str()
                ));
            }
        };
        if read {
            set = set.with(Scope::new(resource, Access::Read));
        }
        if write {
            set = set.with(Scope::new(resource, Access::Write));
        }
    }
    Ok(set)
}

/// Scopes as chips grouped by resource.
pub fn chips(set: ScopeSet) -> Markup {
    html! {
        @if set.is_empty() { span.muted { "no scopes" } }
        @for resource in Resource::ALL {
            @match level(set, resource) {
                "read" => { span.chip { (resource.as_str()) ": read" } }
                "write" => { span.chip.write { (resource.as_str()) ": read, write" } }
                "writeonly" => { span.chip.write { (resource.as_str()) ": write" } }
                _ => {}
            }
        }
    }
}

pub fn field<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_round_trips_every_level() {
        let set = ScopeSet::parse("blob:read blob:write sqlite:read email:write").expect("set");
        let fields: Vec<(String, String)> = Resource::ALL
            .iter()
            .map(|r| (format!("scope_{}", r.as_str()), level(set, *r).to_owned()))
            .collect();
        assert_eq!(parse(&fields).expect("parse"), set);
        assert!(parse(&[("scope_blob".into(), "all".into())]).is_err());
    }
}

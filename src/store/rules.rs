//! `rules.json`: standing permission rules, made when a person answers a
//! permission with `"remember"`: for one loop, or for every loop of the
//! user (`always`). Bounded per user.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::json_file::Place;
use super::{JsonStore, LoopId, StoreError};
use crate::agent::rules::{Behavior, Rule};
use crate::ids;

/// Rules one user may have, loops' and user-wide together.
pub const MAX_RULES_PER_USER: usize = 500;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleRecord {
    pub id: String,
    pub user: String,
    /// `None`: every loop of the user.
    pub loop_id: Option<String>,
    pub behavior: Behavior,
    #[serde(flatten)]
    pub rule: Rule,
    pub created_at: DateTime<Utc>,
    /// The choice whose answer made it.
    pub choice_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RulesFile {
    #[serde(default)]
    pub rules: BTreeMap<String, RuleRecord>,
}

pub struct RuleStore {
    file: JsonStore<RulesFile>,
}

impl RuleStore {
    pub fn open(place: Place) -> Result<Self, StoreError> {
        Ok(Self {
            file: JsonStore::open_in(place)?,
        })
    }

    /// Adds a rule; the same rule (user, loop, behavior, tool, content)
    /// made again is the one already there.
    pub fn add(
        &self,
        user: &str,
        loop_id: Option<LoopId>,
        behavior: Behavior,
        rule: Rule,
        choice_id: &str,
    ) -> Result<RuleRecord, StoreError> {
        let loop_id = loop_id.map(|l| l.to_string());
        self.file.update(|f| {
            if let Some(same) = f.rules.values().find(|r| {
                r.user == user && r.loop_id == loop_id && r.behavior == behavior && r.rule == rule
            }) {
                return Ok(same.clone());
            }
            let held = f.rules.values().filter(|r| r.user == user).count();
            if held >= MAX_RULES_PER_USER {
                return Err(StoreError::Full(
                    "too_many_rules",
                    format!(
                        "you have {held} standing rules, as many as one user may; delete some first"
                    ),
                    super::RETRY_AFTER_FREEING,
                ));
            }
            let record = RuleRecord {
                id: format!("rule_{}", ids::random_hex(8)),
                user: user.to_owned(),
                loop_id: loop_id.clone(),
                behavior,
                rule: rule.clone(),
                created_at: ids::now(),
                choice_id: choice_id.to_owned(),
            };
            f.rules.insert(record.id.clone(), record.clone());
            Ok(record)
        })
    }

    /// A loop's own rules (`Some(loop)`), or the user's for every loop
    /// (`None`), oldest first.
    pub fn list(&self, user: &str, loop_id: Option<LoopId>) -> Vec<RuleRecord> {
        let loop_id = loop_id.map(|l| l.to_string());
        let mut found: Vec<RuleRecord> = self
            .file
            .read()
            .rules
            .values()
            .filter(|r| r.user == user && r.loop_id == loop_id)
            .cloned()
            .collect();
        found.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        found
    }

    /// Every rule that applies on a loop: its own and the user's.
    pub fn applicable(&self, user: &str, loop_id: LoopId) -> Vec<RuleRecord> {
        let id = loop_id.to_string();
        self.file
            .read()
            .rules
            .values()
            .filter(|r| r.user == user && r.loop_id.as_ref().is_none_or(|l| *l == id))
            .cloned()
            .collect()
    }

    /// Removes every rule of a user (when the user is removed).
    pub fn delete_all(&self, user: &str) -> Result<(), StoreError> {
        self.file.update(|f| {
            f.rules.retain(|_, r| r.user != user);
            Ok(())
        })
    }

    /// Removes one of a loop's rules (`Some(loop)`) or of the user's.
    pub fn delete(&self, user: &str, loop_id: Option<LoopId>, id: &str) -> Result<(), StoreError> {
        let loop_id = loop_id.map(|l| l.to_string());
        self.file.update(|f| match f.rules.get(id) {
            Some(r) if r.user == user && r.loop_id == loop_id => {
                f.rules.remove(id);
                Ok(())
            }
            _ => Err(StoreError::NotFound(
                "rule_not_found",
                format!("no rule `{id}` here"),
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_per_loop_and_per_user() {
        let dir = tempfile::tempdir().unwrap();
        let place = || Place::File {
            path: dir.path().join("rules.json"),
            lock: dir.path().join(".lock"),
        };
        let store = RuleStore::open(place()).unwrap();
        let (a, b) = (
            LoopId(uuid::Uuid::from_u128(1)),
            LoopId(uuid::Uuid::from_u128(2)),
        );
        let rule = Rule {
            tool: "Bash".into(),
            content: Some("npm test".into()),
        };
        let on_a = store
            .add("alice", Some(a), Behavior::Allow, rule.clone(), "c1")
            .unwrap();
        assert!(on_a.id.starts_with("rule_"));
        // The same again is the same rule.
        assert_eq!(
            store
                .add("alice", Some(a), Behavior::Allow, rule.clone(), "c2")
                .unwrap(),
            on_a
        );
        let always = store
            .add("alice", None, Behavior::Deny, rule.clone(), "c3")
            .unwrap();
        assert_eq!(store.list("alice", Some(a)), vec![on_a.clone()]);
        assert_eq!(store.list("alice", None), vec![always.clone()]);
        assert_eq!(store.applicable("alice", a).len(), 2);
        assert_eq!(store.applicable("alice", b), vec![always.clone()]);
        assert!(store.applicable("bob", a).is_empty());
        // Deleted only where it is, by its user.
        assert!(store.delete("alice", Some(b), &on_a.id).is_err());
        assert!(store.delete("bob", Some(a), &on_a.id).is_err());
        store.delete("alice", Some(a), &on_a.id).unwrap();
        assert_eq!(
            RuleStore::open(place()).unwrap().applicable("alice", a),
            vec![always]
        );
    }
}

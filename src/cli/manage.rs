//! `loopd user …` and `loopd token …`: the same stores the server uses, so
//! they work while `serve` runs and take effect there at once.

use std::io::{BufRead, Write};

use anyhow::Context;
use serde_json::json;

use super::{TokenCommand, UserCommand};
use crate::ids;
use crate::store::audit::{AuditEntry, AuditLog};
use crate::store::rules::RuleStore;
use crate::store::webhooks::WebhookStore;
use crate::store::{Accounts, Grants, MAX_ROTATION_GRACE, TokenRecord, no_such_user};
use crate::store::{Backend, DataDir, StoreError};

/// An act of the operator (the command line) on `user`'s account.
fn operator(audit: &AuditLog, action: &str, user: &str, details: &[(&str, &str)]) {
    let mut entry = AuditEntry::new("operator", action).with("user", user);
    for (k, v) in details {
        entry = entry.with(k, *v);
    }
    if let Err(err) = audit.record(&entry) {
        eprintln!("loopd: could not write the audit trail: {err}");
    }
}

/// What the user and token commands change.
pub struct CliStores {
    pub accounts: Accounts,
    pub audit: AuditLog,
    pub webhooks: WebhookStore,
    pub rules: RuleStore,
}

impl CliStores {
    pub fn open_on(backend: &Backend, dir: &DataDir) -> Result<Self, StoreError> {
        Ok(Self {
            accounts: Accounts::open_on(backend, dir)?,
            audit: AuditLog::open_on(backend, dir),
            webhooks: WebhookStore::open_on(backend, dir)?,
            rules: RuleStore::open_on(backend, dir)?,
        })
    }
}

pub fn run_user(stores: &CliStores, cmd: UserCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let (accounts, audit) = (&stores.accounts, &stores.audit);
    match cmd {
        UserCommand::Add {
            name,
            admin,
            password_stdin,
        } => {
            let (password, generated) = password(password_stdin)?;
            accounts.users.add(&name, admin, &password)?;
            let role = if admin { "admin" } else { "member" };
            operator(audit, "user.added", &name, &[("role", role)]);
            if generated {
                writeln!(out, "{password}")?;
            }
        }
        UserCommand::List { json } => {
            let users = accounts.users.list();
            if json {
                let list: Vec<_> = users
                    .iter()
                    .map(|u| json!({"name": u.name, "admin": u.admin}))
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                for u in users {
                    let role = if u.admin { "admin" } else { "member" };
                    writeln!(out, "{}\t{role}", u.name)?;
                }
            }
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            let (password, generated) = password(password_stdin)?;
            accounts.users.set_password(&name, &password)?;
            accounts.sessions.delete_user(&name)?;
            operator(audit, "user.password_set", &name, &[]);
            if generated {
                writeln!(out, "{password}")?;
            }
        }
        UserCommand::Remove { name } => {
            // The user goes first: without it, neither tokens nor sessions authenticate.
            accounts.users.remove(&name)?;
            accounts.tokens.revoke_all(&name)?;
            accounts.sessions.delete_user(&name)?;
            // Nothing of theirs goes on acting, nor passes to a new user of
            // the same name.
            stores.webhooks.delete_all(&name)?;
            stores.rules.delete_all(&name)?;
            operator(audit, "user.removed", &name, &[]);
        }
    }
    Ok(())
}

pub fn run_token(
    stores: &CliStores,
    cmd: TokenCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (accounts, audit) = (&stores.accounts, &stores.audit);
    let known = |user: &str| {
        accounts
            .users
            .get(user)
            .map(|_| ())
            .ok_or_else(|| no_such_user(user))
    };
    match cmd {
        TokenCommand::Create {
            user,
            label,
            scopes,
            expires_at,
            max_permission_mode,
        } => {
            known(&user)?;
            let grants = Grants {
                scopes: (!scopes.is_empty()).then(|| scopes.into_iter().collect()),
                expires_at,
                max_permission_mode,
            };
            let (plaintext, record) = accounts.tokens.create(&user, label, grants)?;
            operator(
                audit,
                "token.created",
                &user,
                &[("token_id", &record.token_id)],
            );
            writeln!(out, "{plaintext}")?;
        }
        TokenCommand::Rotate {
            user,
            token_id,
            grace,
        } => {
            known(&user)?;
            anyhow::ensure!(
                grace <= MAX_ROTATION_GRACE.num_seconds() as u64,
                "--grace is at most {} seconds",
                MAX_ROTATION_GRACE.num_seconds()
            );
            let (plaintext, record) = accounts.tokens.rotate(
                &user,
                &token_id,
                chrono::Duration::seconds(grace as i64),
                usize::MAX,
            )?;
            let new_id = record.token_id.as_str();
            let details = [("token_id", token_id.as_str()), ("new_token_id", new_id)];
            operator(audit, "token.rotated", &user, &details);
            writeln!(out, "{plaintext}")?;
        }
        TokenCommand::List { user, json } => {
            known(&user)?;
            let tokens = accounts.tokens.list(&user);
            if json {
                let list: Vec<_> = tokens.iter().map(token_json).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                for t in tokens {
                    let last = t
                        .last_used_at
                        .map_or_else(|| "-".to_owned(), |at| rfc3339(&at));
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{last}",
                        t.token_id,
                        t.label.as_deref().unwrap_or("-"),
                        rfc3339(&t.created_at)
                    )?;
                }
            }
        }
        TokenCommand::Revoke { user, token_id } => {
            known(&user)?;
            accounts.tokens.revoke(&user, &token_id)?;
            operator(audit, "token.revoked", &user, &[("token_id", &token_id)]);
        }
    }
    Ok(())
}

fn token_json(t: &TokenRecord) -> serde_json::Value {
    json!({
        "tokenId": t.token_id,
        "label": t.label,
        "createdAt": t.created_at,
        "lastUsedAt": t.last_used_at,
        "scopes": t.grants.scopes,
        "expiresAt": t.grants.expires_at,
        "maxPermissionMode": t.grants.max_permission_mode,
    })
}

fn rfc3339(at: &chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The password from stdin's first line, or a generated one (`true`).
fn password(from_stdin: bool) -> anyhow::Result<(String, bool)> {
    if !from_stdin {
        return Ok((ids::random_password(), true));
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    Ok((password, false))
}

//! `loopd audit`: the audit trail, oldest first, as tab-separated lines or
//! JSON lines.

use std::io::Write;

use crate::store::audit::{AuditFilter, AuditLog};

pub fn run_audit(
    audit: &AuditLog,
    filter: &AuditFilter,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    for entry in audit.read(filter)? {
        if json {
            writeln!(out, "{}", serde_json::to_string(&entry)?)?;
        } else {
            let at = entry
                .at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let client = entry.client.as_deref().unwrap_or("-");
            let details = if entry.details.is_empty() {
                "-".to_owned()
            } else {
                serde_json::to_string(&entry.details)?
            };
            writeln!(
                out,
                "{at}\t{}\t{}\t{client}\t{details}",
                entry.user, entry.action
            )?;
        }
    }
    Ok(())
}

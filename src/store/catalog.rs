//! The optional building blocks a loop can name: `profiles/<name>/CLAUDE.md`,
//! `vaults/<name>.env` and `repos/<name>/` (a git repository).
//!
//! A vault is granted per user: `vaults/<name>.users` lists who may use it
//! (one username a line, `#` comments, `*` for everyone). Admins may use
//! every vault, and `default` is everyone's.

use std::path::{Path, PathBuf};

use super::{StoreError, valid_name};

/// The vault every loop gets unless it names another; it need not exist.
pub const DEFAULT_VAULT: &str = "default";

#[derive(Debug, Clone)]
pub struct Catalog {
    root: PathBuf,
}

impl Catalog {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.to_owned(),
        }
    }

    pub fn profile_path(&self, name: &str) -> PathBuf {
        self.root.join("profiles").join(name).join("CLAUDE.md")
    }
    pub fn vault_path(&self, name: &str) -> PathBuf {
        self.root.join("vaults").join(format!("{name}.env"))
    }
    pub fn repo_path(&self, name: &str) -> PathBuf {
        self.root.join("repos").join(name)
    }

    pub fn check_profiles(&self, names: &[String]) -> Result<(), StoreError> {
        for (i, name) in names.iter().enumerate() {
            if !valid_name(name) || !self.profile_path(name).is_file() {
                return Err(StoreError::Invalid(
                    "profile_not_found",
                    format!(
                        "no profile `{name}` (expected profiles/{name}/CLAUDE.md in the data directory)"
                    ),
                ));
            }
            if names[..i].contains(name) {
                return Err(StoreError::Invalid(
                    "duplicate_profile",
                    format!("profile `{name}` is listed twice"),
                ));
            }
        }
        Ok(())
    }

    pub fn vault_grants_path(&self, name: &str) -> PathBuf {
        self.root.join("vaults").join(format!("{name}.users"))
    }

    /// Whether `user` may use vault `name`. The default vault may be absent
    /// (then the agent gets no extra variables). An unknown vault and one not
    /// granted answer alike, so names cannot be probed.
    pub fn check_vault(&self, name: &str, user: &str, admin: bool) -> Result<(), StoreError> {
        if name == DEFAULT_VAULT
            || (valid_name(name)
                && self.vault_path(name).is_file()
                && (admin || self.vault_granted(name, user)))
        {
            return Ok(());
        }
        Err(StoreError::Invalid(
            "vault_not_found",
            format!("no vault `{name}` that you may use"),
        ))
    }

    fn vault_granted(&self, name: &str, user: &str) -> bool {
        let Ok(text) = std::fs::read_to_string(self.vault_grants_path(name)) else {
            return false;
        };
        text.lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .any(|l| l == "*" || l == user)
    }

    pub fn check_repo(&self, name: &str) -> Result<(), StoreError> {
        let path = self.repo_path(name);
        // A work tree has `.git`; a bare repository has `HEAD` at its top.
        if valid_name(name) && (path.join(".git").exists() || path.join("HEAD").is_file()) {
            return Ok(());
        }
        Err(StoreError::Invalid(
            "repo_not_found",
            format!("no git repository `{name}` (expected repos/{name}/ in the data directory)"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn finds_what_exists_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("profiles/rust")).unwrap();
        fs::write(root.join("profiles/rust/CLAUDE.md"), "be rusty").unwrap();
        fs::create_dir_all(root.join("vaults")).unwrap();
        fs::write(root.join("vaults/prod.env"), "A=1\n").unwrap();
        fs::create_dir_all(root.join("repos/app/.git")).unwrap();
        fs::create_dir_all(root.join("repos/plain")).unwrap();
        let c = Catalog::new(root);

        c.check_profiles(&["rust".into()]).unwrap();
        let code = |r: Result<(), StoreError>| match r {
            Err(StoreError::Invalid(code, _)) => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(code(c.check_profiles(&["go".into()])), "profile_not_found");
        assert_eq!(
            code(c.check_profiles(&["../x".into()])),
            "profile_not_found"
        );
        assert_eq!(
            code(c.check_profiles(&["rust".into(), "rust".into()])),
            "duplicate_profile"
        );
        fs::write(root.join("vaults/team.env"), "A=1\n").unwrap();
        fs::write(
            root.join("vaults/team.users"),
            "# who may\nalice\n  bob  # too\n",
        )
        .unwrap();
        fs::write(root.join("vaults/open.env"), "A=1\n").unwrap();
        fs::write(root.join("vaults/open.users"), "*\n").unwrap();
        c.check_vault("default", "carol", false).unwrap();
        c.check_vault("prod", "root", true).unwrap();
        c.check_vault("team", "alice", false).unwrap();
        c.check_vault("team", "bob", false).unwrap();
        c.check_vault("open", "carol", false).unwrap();
        // Not granted, unknown, or a path: the same answer.
        let denied = |name: &str, user: &str| match c.check_vault(name, user, false) {
            Err(StoreError::Invalid(code, message)) => (code, message.replace(name, "?")),
            other => panic!("{other:?}"),
        };
        assert_eq!(denied("prod", "alice"), denied("staging", "alice"));
        assert_eq!(denied("team", "carol").0, "vault_not_found");
        assert_eq!(denied("../vaults/prod", "alice").0, "vault_not_found");
        c.check_repo("app").unwrap();
        assert_eq!(code(c.check_repo("plain")), "repo_not_found");
        assert_eq!(code(c.check_repo("..")), "repo_not_found");
    }
}

//! File modes: the data directory and every file of a vault belong to the
//! server's user alone.
//!
//! Guarantees: files Sovra creates are 0600 and directories 0700 whatever
//! the umask it was started with ([`private_umask`]); `sovra serve`
//! refuses to start on a configuration, schema, policy, key or data file
//! (or a directory holding them) that group or others may write, naming
//! it ([`refuse_shared_writes`]): such a file would let a local user add a
//! principal, a `permit` or a forged record.
//!
//! Does not guarantee: anything against root or the server's own user, or
//! on platforms without Unix modes (there these checks do nothing).

use std::path::Path;

use crate::error::{Result, VaultError};

/// Sets the process umask to 077, so that every file and directory created
/// from here on (by Sovra, sled or the ledger) is private to this user.
pub fn private_umask() {
    #[cfg(unix)]
    {
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    }
}

/// Refuses `path` if group or others may write it.
pub fn refuse_writable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| VaultError::config(&shown, format!("cannot inspect: {e}")))?;
        let mode = meta.permissions().mode() & 0o7777;
        if !meta.file_type().is_symlink() && mode & 0o022 != 0 {
            return Err(VaultError::config(
                &shown,
                format!(
                    "mode {mode:o} lets group or others write it; refusing to start \
                     (chmod go-w it, and check nobody changed it: 600 for files, 700 for directories)"
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses `dir` or anything under it that group or others may write.
/// A missing `dir` is not checked (it is created private).
pub fn refuse_writable_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    refuse_writable(dir)?;
    if !dir.is_dir() {
        return Ok(());
    }
    let shown = dir.display().to_string();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| VaultError::config(&shown, format!("cannot list: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| VaultError::config(&shown, format!("cannot list: {e}")))?;
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map_err(|e| VaultError::config(path.display().to_string(), e.to_string()))?
            .is_dir();
        if is_dir {
            refuse_writable_tree(&path)?;
        } else {
            refuse_writable(&path)?;
        }
    }
    Ok(())
}

/// Makes `dir` (which exists) private: mode 0700.
pub fn make_private_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
            VaultError::config(dir.display().to_string(), format!("cannot chmod 700: {e}"))
        })?;
    }
    Ok(())
}

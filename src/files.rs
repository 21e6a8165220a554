//! Files the data plane writes (ready file, status file): readable only by us, replaced
//! atomically, and never through a name another user can predict or pre-create.
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

fn random_hex() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Write `data` to `path` (mode 0600) atomically: a fresh temp file created exclusively
/// (O_CREAT|O_EXCL|O_NOFOLLOW, random name) in the same directory, then renamed over `path`.
/// In a shared sticky directory another user can neither make us write into their file nor
/// redirect us through a symlink.
pub fn write_private(path: &str, data: &[u8]) -> std::io::Result<()> {
    let p = Path::new(path);
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = p.with_file_name(format!(".{name}.{}.tmp", random_hex()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)?;
    let written = f.write_all(data).and_then(|_| f.sync_data().or(Ok(())));
    drop(f);
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, p)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_atomically_with_mode_0600_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("hpcfed-files-{}", random_hex()));
        std::fs::create_dir(&dir).unwrap();
        let target = dir.join("status.json");
        std::fs::write(&target, "old").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_private(target.to_str().unwrap(), b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temp_names_are_not_predictable() {
        assert_ne!(random_hex(), random_hex());
    }
}

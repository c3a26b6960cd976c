//! Filesystem side of a batch: listing the input tree, reading an input without being stalled or
//! flooded by it, atomic output writes (temp file in the same directory, then rename), checking
//! that an output is on disk, and removing the temp files of one batch.
//!
//! Names are bytes (`OsStr`), never converted to text: a name that is not UTF-8 is read and
//! written under its own bytes, and two such names never collide.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// Suffix of in-progress output files; they are hidden (leading dot) and never a final output.
pub const TEMP_SUFFIX: &str = ".pipeline-tmp";

/// Bytes of an output's own name kept in its temp file's name: the rest of the temp name (batch,
/// writer, pid, counter, suffix) must fit beside it under the 255-byte limit of a name.
const TEMP_NAME_BYTES: usize = 120;

/// The input tree as [`list`] found it.
#[derive(Debug, Default)]
pub struct Listing {
    /// Files (and links to anything but a directory), relative to the root, sorted.
    pub files: Vec<PathBuf>,
    /// Links to a directory that is one of their own ancestors: not walked, or the walk would
    /// never end.
    pub loops: Vec<PathBuf>,
}

/// Lists regular files under `root` (recursively, sorted, relative paths), skipping `skip` (the
/// output directory when the walk meets it) and our own temp files. See [`list`].
pub fn list_files(root: &Path, skip: Option<&Path>) -> std::io::Result<Vec<PathBuf>> {
    list(root, skip).map(|l| l.files)
}

/// Walks `root`: regular files and links to files are listed under their own names (bytes, as
/// on disk); links to directories are walked like directories, under the link's name, unless the
/// directory is one of the link's own ancestors (a loop, reported in [`Listing::loops`]). The
/// directory `skip` (compared by device and inode, so also when met through a link) is left
/// out, as are temp files ([`TEMP_SUFFIX`]) and job records ([`crate::job::JOB_FILE`]). Other special files (pipes, sockets, devices) are
/// listed only through a link, and then refused by [`read_input`] with a reason.
pub fn list(root: &Path, skip: Option<&Path>) -> std::io::Result<Listing> {
    let skip = skip
        .and_then(|s| std::fs::metadata(s).ok())
        .map(|m| (m.dev(), m.ino()));
    let top = std::fs::metadata(root)?;
    let mut ancestors = vec![(top.dev(), top.ino())];
    let mut listing = Listing::default();
    walk(root, Path::new(""), &mut ancestors, skip, &mut listing)?;
    listing.files.sort();
    Ok(listing)
}

fn walk(
    dir: &Path,
    rel: &Path,
    ancestors: &mut Vec<(u64, u64)>,
    skip: Option<(u64, u64)>,
    listing: &mut Listing,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let path = entry.path();
        let rel_path = rel.join(&name);
        let kind = entry.file_type()?;
        let as_dir = if kind.is_dir() {
            Some(entry.metadata()?)
        } else if kind.is_symlink() {
            std::fs::metadata(&path).ok().filter(Metadata::is_dir)
        } else {
            None
        };
        if let Some(meta) = as_dir {
            let key = (meta.dev(), meta.ino());
            if skip == Some(key) {
                continue;
            }
            if ancestors.contains(&key) {
                tracing::warn!(link = %rel_path.display(), "link loops back to its own ancestor, not walked");
                listing.loops.push(rel_path);
                continue;
            }
            ancestors.push(key);
            let walked = walk(&path, &rel_path, ancestors, skip, listing);
            ancestors.pop();
            walked?;
        } else if (kind.is_file() || kind.is_symlink()) && !is_ours(&name) {
            listing.files.push(rel_path);
        }
    }
    Ok(())
}

fn is_temp(name: &OsStr) -> bool {
    name.as_bytes().ends_with(TEMP_SUFFIX.as_bytes())
}

/// Our own files, never an input or an output: temp files and a job's record
/// and journal (names starting with [`crate::job::JOB_FILE`]; an output tree may be the next
/// stage's input).
fn is_ours(name: &OsStr) -> bool {
    is_temp(name) || name.as_bytes().starts_with(crate::job::JOB_FILE.as_bytes())
}

/// Reads one input file whole, refusing before reading anything that is not a regular file (a
/// named pipe would block the reader for good, a device could stream for ever) or that is larger
/// than `max` bytes (a 1.5 GiB file would cost 1.5 GiB of memory). The type is checked on the
/// path first and on the opened file again; a file that grows past `max` while read is refused.
pub fn read_input(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    check_input(&std::fs::metadata(path).map_err(cannot)?, max)?;
    let file = File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    check_input(&meta, max)?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > max {
        return Err(format!("grew beyond the {max}-byte limit while read"));
    }
    Ok(bytes)
}

fn check_input(meta: &Metadata, max: u64) -> Result<(), String> {
    let t = meta.file_type();
    let kind = if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a named pipe")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_char_device() || t.is_block_device() {
        Some("a device")
    } else {
        Some("not a regular file")
    };
    if let Some(kind) = kind {
        return Err(format!(
            "{kind}, not a regular file: refused without reading"
        ));
    }
    if meta.len() > max {
        return Err(format!(
            "{} bytes, more than the {max}-byte limit: refused without reading",
            meta.len()
        ));
    }
    Ok(())
}

/// The writer tag of a temp file of `batch` written by `writer`: `BATCH.WRITER`, both reduced to
/// ASCII letters, digits and dashes. [`remove_batch_temp_files`] knows a batch's own by it.
pub fn temp_tag(batch: &str, writer: &str) -> String {
    format!("{}.{}", plain(batch), plain(writer))
}

fn plain(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(32)
        .collect()
}

/// Writes `bytes` to `dest` so that readers see either no file or the whole file, also after a
/// crash of the host: a temp file next to it (same filesystem, so the rename is atomic), synced,
/// renamed over `dest`, and the directory synced so that the rename itself is on disk.
/// Two writers of the same `dest` (a task done twice after a re-send) each rename a complete
/// file: the last rename wins and there is still exactly one file. `writer_tag` goes into the
/// temp file's name: [`temp_tag`] makes one that names the batch.
pub fn write_atomic(dest: &Path, bytes: &[u8], writer_tag: &str) -> std::io::Result<()> {
    write_atomic_if(dest, bytes, writer_tag, || true).map(|_| ())
}

/// [`write_atomic`], but `keep` is asked just before the rename: when it says no (the output is
/// no longer wanted, e.g. its batch is over), the temp file is removed and `Ok(false)` returned.
pub fn write_atomic_if(
    dest: &Path,
    bytes: &[u8],
    writer_tag: &str,
    keep: impl FnOnce() -> bool,
) -> std::io::Result<bool> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = dest.file_name().map_or(&b"output"[..], |n| n.as_bytes());
    let name = &name[..name.len().min(TEMP_NAME_BYTES)];
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = OsString::from(".");
    tmp_name.push(OsStr::from_bytes(name));
    tmp_name.push(format!(
        ".{writer_tag}-{}-{n}{TEMP_SUFFIX}",
        std::process::id()
    ));
    let tmp = parent.join(tmp_name);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        // Without it a crash can leave a renamed but empty or partial file: the rename may
        // reach the disk before the data.
        f.sync_all()?;
        if !keep() {
            std::fs::remove_file(&tmp)?;
            return Ok(false);
        }
        std::fs::rename(&tmp, dest)?;
        sync_dir(parent)?;
        Ok(true)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Whether `path` exists and was modified after `time`.
pub fn modified_after(path: &Path, time: SystemTime) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|m| m > time)
}

/// Checks that an output a worker reported done is on disk: a regular file modified at `since`
/// or later (not a file an earlier batch left there).
pub fn output_on_disk(path: &Path, since: SystemTime) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("reported done, but no output on disk ({e})"))?;
    if !meta.is_file() {
        return Err("reported done, but the output is not a regular file".into());
    }
    match meta.modified() {
        Ok(m) if m >= since => Ok(()),
        Ok(_) => Err("reported done, but the output on disk is older than the batch".into()),
        Err(e) => Err(format!(
            "reported done, but the output's time is unknown ({e})"
        )),
    }
}

/// Makes a rename (or creation) in `dir` durable: the entry lives in the directory's own data.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Temp files under `root`, of any batch: left by writers that died mid-write (or still writing).
pub fn temp_files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(_) if is_temp(&entry.file_name()) => found.push(path),
                _ => {}
            }
        }
    }
    found
}

/// Whether `name` is a temp file written with a [`temp_tag`] of `batch`.
pub fn is_temp_of(name: &OsStr, batch: &str) -> bool {
    let marker = format!(".{}.", plain(batch));
    let bytes = name.as_bytes();
    bytes.starts_with(b".")
        && is_temp(name)
        && bytes.windows(marker.len()).any(|w| w == marker.as_bytes())
}

/// Removes, in the directories `dirs` (those of a batch's outputs), the temp files of `batch`
/// alone, left by its writers that died mid-write; returns how many. Another batch writing into
/// the same directories at the same time keeps its own.
pub fn remove_batch_temp_files<'a>(dirs: impl IntoIterator<Item = &'a Path>, batch: &str) -> usize {
    remove_batches_temp_files(dirs, &[batch])
}

/// [`remove_batch_temp_files`] for several batches at once (a job's batches: the current one
/// and those of its masters that were killed), each directory read once.
pub fn remove_batches_temp_files<'a>(
    dirs: impl IntoIterator<Item = &'a Path>,
    batches: &[&str],
) -> usize {
    let mut removed = 0;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let own = batches.iter().any(|b| is_temp_of(&name, b))
                && entry.file_type().is_ok_and(|t| t.is_file());
            if own && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// The directories the outputs `rels` go to under `output`, each once.
pub fn output_dirs<'a>(output: &Path, rels: impl IntoIterator<Item = &'a Path>) -> Vec<PathBuf> {
    let dirs: BTreeSet<PathBuf> = rels
        .into_iter()
        .map(|rel| output.join(rel).parent().unwrap_or(output).to_path_buf())
        .collect();
    dirs.into_iter().collect()
}

/// `path` made absolute with every link resolved, also when its last components do not exist
/// yet (the output directory before it is created): its longest existing ancestor is resolved
/// and the rest appended.
pub fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let mut existing = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    // The missing tail, last component first; `None` stands for `..`.
    let mut tail: Vec<Option<OsString>> = Vec::new();
    loop {
        match std::fs::canonicalize(&existing) {
            Ok(mut resolved) => {
                for part in tail.into_iter().rev() {
                    match part {
                        Some(name) => resolved.push(name),
                        None => {
                            resolved.pop();
                        }
                    }
                }
                return Ok(resolved);
            }
            Err(e) => {
                match existing.components().next_back() {
                    Some(Component::Normal(name)) => tail.push(Some(name.to_os_string())),
                    Some(Component::ParentDir) => tail.push(None),
                    Some(Component::CurDir) => {}
                    _ => return Err(e),
                }
                if !existing.pop() {
                    return Err(e);
                }
            }
        }
    }
}

/// Checks that `dir` exists or can be created and that files can be created in it.
pub fn check_writable(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".probe-{}{TEMP_SUFFIX}", std::process::id()));
    File::create(&probe)?;
    std::fs::remove_file(&probe)
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStringExt;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pipeline-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    fn bytes_name(b: &[u8]) -> PathBuf {
        PathBuf::from(OsString::from_vec(b.to_vec()))
    }

    #[test]
    fn atomic_write_leaves_one_file_and_no_temp() {
        let d = scratch("atomic");
        let dest = d.join("a/b/c.png");
        write_atomic(&dest, b"one", &temp_tag("b1", "w1")).expect("write");
        write_atomic(&dest, b"two", &temp_tag("b1", "w2")).expect("write again");
        assert_eq!(std::fs::read(&dest).expect("read"), b"two");
        assert_eq!(
            list_files(&d, None).expect("list"),
            vec![PathBuf::from("a/b/c.png")]
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_batch_removes_only_its_own_temp_files() {
        let d = scratch("temps");
        let mine = d.join(format!(
            ".a.png.{}-1-0{TEMP_SUFFIX}",
            temp_tag("aaaa", "w1")
        ));
        let theirs = d.join(format!(
            ".b.png.{}-1-0{TEMP_SUFFIX}",
            temp_tag("bbbb", "w1")
        ));
        let old_style = d.join(format!(".c.png.w1-1-0{TEMP_SUFFIX}"));
        for p in [&mine, &theirs, &old_style] {
            std::fs::write(p, b"half").expect("temp");
        }
        assert_eq!(remove_batch_temp_files([d.as_path()], "aaaa"), 1);
        assert!(!mine.exists());
        assert!(theirs.exists() && old_style.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn listing_skips_output_inside_input() {
        let d = scratch("skip");
        std::fs::create_dir_all(d.join("out")).expect("mkdir");
        std::fs::write(d.join("in.png"), b"x").expect("write");
        std::fs::write(d.join("out/old.png"), b"x").expect("write");
        let got = list_files(&d, Some(&d.join("out"))).expect("list");
        assert_eq!(got, vec![PathBuf::from("in.png")]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn listing_walks_linked_folders_refuses_loops_and_keeps_byte_names() {
        let d = scratch("links");
        let (root, archive) = (d.join("in"), d.join("archive"));
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::create_dir_all(&archive).expect("mkdir");
        std::fs::write(archive.join("x.png"), b"x").expect("write");
        std::os::unix::fs::symlink(&archive, root.join("2023")).expect("link");
        std::os::unix::fs::symlink("..", root.join("sub/up")).expect("loop");
        for name in [&b"caf\xe9.png"[..], b"\xff\xfe.png", b"\xfe\xff.png"] {
            std::fs::write(root.join(bytes_name(name)), b"x").expect("write");
        }
        let l = list(&root, None).expect("list");
        assert_eq!(l.loops, vec![PathBuf::from("sub/up")]);
        let mut want = vec![
            PathBuf::from("2023/x.png"),
            bytes_name(b"caf\xe9.png"),
            bytes_name(b"\xff\xfe.png"),
            bytes_name(b"\xfe\xff.png"),
        ];
        want.sort();
        assert_eq!(l.files, want);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn inputs_that_are_not_regular_files_or_too_large_are_refused_unread() {
        let d = scratch("inputs");
        std::fs::write(d.join("ok.png"), b"12345").expect("write");
        assert_eq!(read_input(&d.join("ok.png"), 5).expect("read"), b"12345");
        let err = read_input(&d.join("ok.png"), 4).expect_err("too large");
        assert!(err.contains("more than the 4-byte limit"), "{err}");
        assert!(read_input(&d, 100)
            .expect_err("a dir")
            .contains("directory"));
        let status = std::process::Command::new("mkfifo")
            .arg(d.join("pipe"))
            .status()
            .expect("mkfifo");
        assert!(status.success());
        std::os::unix::fs::symlink(d.join("pipe"), d.join("poison.png")).expect("link");
        let err = read_input(&d.join("poison.png"), 100).expect_err("a pipe");
        assert!(err.contains("named pipe"), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn resolve_follows_links_and_keeps_missing_tails() {
        let d = scratch("resolve");
        std::fs::create_dir_all(d.join("real")).expect("mkdir");
        std::os::unix::fs::symlink(d.join("real"), d.join("link")).expect("link");
        let real = std::fs::canonicalize(d.join("real")).expect("canonical");
        assert_eq!(
            resolve(&d.join("link/new/out")).expect("resolve"),
            real.join("new/out")
        );
        assert_eq!(resolve(&d.join("link")).expect("resolve"), real);
        let _ = std::fs::remove_dir_all(&d);
    }
}

//! Turning a layer definition into the exact, sorted list of tar entries it stands for.
//!
//! This is where the build context is read: walked in byte-wise sorted order (never in
//! `read_dir` order), filtered by `.imagoignore` and the copy's excludes, with each file's stat
//! kept as its cache fingerprint. Nothing here reads file contents.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use imago_layer::writer::Meta;
use serde_spanned::Spanned;

use crate::BuildError;
use crate::definition::{CopyDef, DefinitionFile, LayerDef};

/// The stat fields that identify a file's content for the cache. A content change always moves
/// ctime (the kernel sets it on every write and on every utime call), so keeping size and mtime
/// does not hide a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub mode: u32,
}

impl Stamp {
    pub fn of(metadata: &fs::Metadata) -> Stamp {
        Stamp {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.size(),
            mtime_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
            ctime_ns: i128::from(metadata.ctime()) * 1_000_000_000
                + i128::from(metadata.ctime_nsec()),
            mode: metadata.mode(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    /// A file from the context (or the host, for `outside_context` copies).
    File {
        source: PathBuf,
        stamp: Stamp,
    },
    Inline(Vec<u8>),
    Symlink(Vec<u8>),
    /// A file of the context that is a hard link of a file planned at `target` (a path in the
    /// layer that sorts before this one).
    Hardlink {
        target: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub meta: Meta,
    /// Where in imago.toml this entry comes from, for errors found later.
    pub origin: Range<usize>,
}

/// One layer's entries, keyed by path in the image (relative, no leading or trailing `/`).
#[derive(Debug, Default)]
pub struct LayerPlan {
    pub name: Option<String>,
    pub entries: BTreeMap<Vec<u8>, Entry>,
}

impl LayerPlan {
    /// Entries in the order the layer writer requires (directories sort with their `/`).
    pub fn sorted(&self) -> Vec<(Vec<u8>, &Entry)> {
        let mut list: Vec<(Vec<u8>, &Entry)> = self
            .entries
            .iter()
            .map(|(path, e)| {
                (
                    imago_layer::writer::entry_sort_key(path, e.kind == EntryKind::Dir),
                    e,
                )
            })
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list
    }

    pub fn file_count(&self) -> usize {
        self.entries
            .values()
            .filter(|e| matches!(e.kind, EntryKind::File { .. }))
            .count()
    }

    pub fn file_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match &e.kind {
                EntryKind::File { stamp, .. } => stamp.size,
                EntryKind::Inline(c) => c.len() as u64,
                _ => 0,
            })
            .sum()
    }
}

const ROOT_META: Meta = Meta {
    mode: 0o755,
    uid: 0,
    gid: 0,
};

/// The build context: its root and its `.imagoignore`.
pub struct Context {
    pub root: PathBuf,
    ignore: Gitignore,
}

impl Context {
    pub fn open(root: &Path) -> Result<Context, BuildError> {
        let root = fs::canonicalize(root).map_err(|source| BuildError::Io {
            path: root.to_owned(),
            source,
        })?;
        let mut builder = GitignoreBuilder::new(&root);
        let ignore_file = root.join(".imagoignore");
        if ignore_file.is_file()
            && let Some(e) = builder.add(&ignore_file)
        {
            return Err(BuildError::Ignore {
                path: ignore_file,
                message: e.to_string(),
            });
        }
        let ignore = builder.build().map_err(|e| BuildError::Ignore {
            path: ignore_file,
            message: e.to_string(),
        })?;
        Ok(Context { root, ignore })
    }

    fn ignored(&self, path: &Path, is_dir: bool) -> bool {
        path.starts_with(&self.root)
            && self
                .ignore
                .matched_path_or_any_parents(path, is_dir)
                .is_ignore()
    }
}

pub fn plan_layer(
    file: &DefinitionFile,
    context: &Context,
    layer: &LayerDef,
) -> Result<LayerPlan, BuildError> {
    let mut plan = LayerPlan {
        name: layer.name.clone(),
        entries: BTreeMap::new(),
    };
    for dir in &layer.dir {
        let path = image_path(file, &dir.path, false)?;
        let meta = meta(file, dir.owner.as_ref(), dir.mode.as_ref(), 0o755)?;
        insert(&mut plan, path, EntryKind::Dir, meta, dir.path.span())?;
    }
    for copy in &layer.copy {
        plan_copy(file, context, copy, &mut plan)?;
    }
    for f in &layer.file {
        let path = image_path(file, &f.path, false)?;
        let meta = meta(file, f.owner.as_ref(), f.mode.as_ref(), 0o644)?;
        let content = EntryKind::Inline(f.content.as_bytes().to_vec());
        insert(&mut plan, path, content, meta, f.path.span())?;
    }
    for link in &layer.symlink {
        let path = image_path(file, &link.path, false)?;
        let meta = meta(file, link.owner.as_ref(), None, 0o777)?;
        if link.target.is_empty() || link.target.contains('\0') {
            return Err(file.error(
                link.path.span(),
                format!(
                    "symlink {} has an empty or invalid target",
                    link.path.get_ref()
                ),
                "set target to the path the link points to",
            ));
        }
        let target = EntryKind::Symlink(link.target.as_bytes().to_vec());
        insert(&mut plan, path, target, meta, link.path.span())?;
    }
    add_parents(file, &mut plan)?;
    link_hard_links(&mut plan);
    Ok(plan)
}

/// Files of the context that are hard links of each other (same device and inode, reached
/// through different source paths) are stored once: the first in layer order as a regular file,
/// each later one as a hard-link entry pointing at it. Which one is first depends only on the
/// paths in the image, never on the order the links were made or walked. Only links whose
/// entries have the same mode and owner are joined (one inode has one of each), and a source
/// copied twice stays two files: the definition asked for two copies.
fn link_hard_links(plan: &mut LayerPlan) {
    // Among files the layer order is the byte order of the path (only directories get a `/`).
    let mut first: HashMap<(u64, u64, Meta), (Vec<u8>, PathBuf)> = HashMap::new();
    for (path, entry) in plan.entries.iter_mut() {
        let EntryKind::File { source, stamp } = &entry.kind else {
            continue;
        };
        let key = (stamp.dev, stamp.ino, entry.meta);
        match first.get(&key) {
            Some((target, target_source)) if target_source != source => {
                entry.kind = EntryKind::Hardlink {
                    target: target.clone(),
                };
            }
            Some(_) => {}
            None => {
                first.insert(key, (path.clone(), source.clone()));
            }
        }
    }
}

/// Later items replace earlier ones at the same path, like a later layer would.
fn insert(
    plan: &mut LayerPlan,
    path: Vec<u8>,
    kind: EntryKind,
    meta: Meta,
    origin: Range<usize>,
) -> Result<(), BuildError> {
    plan.entries.insert(path, Entry { kind, meta, origin });
    Ok(())
}

/// Every entry's parent directories must be in the layer, as directories: tools that unpack a
/// layer create missing parents with their own defaults, which would make the result depend on
/// the tool.
fn add_parents(file: &DefinitionFile, plan: &mut LayerPlan) -> Result<(), BuildError> {
    let mut missing: BTreeMap<Vec<u8>, Range<usize>> = BTreeMap::new();
    for (path, entry) in &plan.entries {
        let mut end = path.len();
        while let Some(slash) = path[..end].iter().rposition(|b| *b == b'/') {
            let parent = &path[..slash];
            match plan.entries.get(parent) {
                Some(p) if p.kind == EntryKind::Dir => break,
                Some(_) => {
                    return Err(file.error(
                        entry.origin.clone(),
                        format!(
                            "/{} needs /{} to be a directory, but this layer also makes it a file or symlink",
                            String::from_utf8_lossy(path),
                            String::from_utf8_lossy(parent)
                        ),
                        "give the two items different destinations",
                    ));
                }
                None => {
                    missing
                        .entry(parent.to_vec())
                        .or_insert_with(|| entry.origin.clone());
                }
            }
            end = slash;
        }
    }
    for (path, origin) in missing {
        plan.entries.insert(
            path,
            Entry {
                kind: EntryKind::Dir,
                meta: ROOT_META,
                origin,
            },
        );
    }
    Ok(())
}

fn plan_copy(
    file: &DefinitionFile,
    context: &Context,
    copy: &CopyDef,
    plan: &mut LayerPlan,
) -> Result<(), BuildError> {
    let src = copy.src.get_ref();
    let span = copy.src.span();
    let owner = parse_owner(file, copy.owner.as_ref())?;
    let file_mode = copy
        .mode
        .as_ref()
        .map(|m| parse_mode(file, m))
        .transpose()?;
    let dir_mode = copy
        .dir_mode
        .as_ref()
        .map(|m| parse_mode(file, m))
        .transpose()?;
    let dest_is_dir = copy.dest.get_ref().ends_with('/');
    let dest = image_path(file, &copy.dest, true)?;

    // Where the source lives, checked to stay inside the context unless allowed.
    let src_path = Path::new(src);
    let escapes = src_path.is_absolute()
        || src_path
            .components()
            .try_fold(0i32, |depth, c| match c {
                Component::ParentDir if depth == 0 => None,
                Component::ParentDir => Some(depth - 1),
                Component::Normal(_) => Some(depth + 1),
                _ => Some(depth),
            })
            .is_none();
    if escapes && !copy.outside_context {
        return Err(file.error(
            span.clone(),
            format!("copy source {src} is outside the build context {}", context.root.display()),
            "move the file into the context, or add `outside_context = true` to this copy to read it from this machine",
        ));
    }
    let absolute = context.root.join(src_path);

    let (by_name, by_path): (Vec<_>, Vec<_>) = copy
        .exclude
        .iter()
        .cloned()
        .partition(|p| !p.get_ref().contains('/'));
    let excludes = glob_set(file, &by_path)?;
    let excludes_by_name = glob_set(file, &by_name)?;
    let mut walker = Walker {
        file,
        context,
        excludes: &excludes,
        excludes_by_name: &excludes_by_name,
        owner,
        file_mode,
        dir_mode,
        span: span.clone(),
        out: Vec::new(),
        check_ignore: !escapes,
    };

    if is_glob(src) {
        let (base, pattern) = split_glob(src);
        let matcher = GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(|e| {
                file.error(
                    span.clone(),
                    format!("invalid glob {src}: {e}"),
                    "see globset syntax: *, ?, [..], {a,b}, **",
                )
            })?
            .compile_matcher();
        let base_dir = context.root.join(base);
        if base_dir.is_dir() {
            walker.walk(&base_dir, b"", Some(&matcher))?;
        }
        if walker.out.iter().all(|(_, k, _)| *k == EntryKind::Dir) {
            return Err(file.error(
                span,
                format!(
                    "glob {src} matches no file in the build context {}",
                    context.root.display()
                ),
                "globs are relative to the context; check .imagoignore and `exclude` too",
            ));
        }
        if !dest_is_dir && !dest.is_empty() {
            return Err(file.error(
                copy.dest.span(),
                format!(
                    "destination {} of a glob copy must be a directory",
                    copy.dest.get_ref()
                ),
                "end the destination with `/`",
            ));
        }
        for (rel, kind, meta) in walker.out {
            insert(plan, join(&dest, &rel), kind, meta, span.clone())?;
        }
        return Ok(());
    }

    let metadata = fs::symlink_metadata(&absolute).map_err(|e| {
        file.error(
            span.clone(),
            format!("copy source {} cannot be read: {e}", absolute.display()),
            "source paths are relative to the build context",
        )
    })?;
    if walker.check_ignore && context.ignored(&absolute, metadata.is_dir()) {
        return Err(file.error(
            span,
            format!("copy source {src} is excluded by .imagoignore"),
            "remove the matching line from .imagoignore or copy something else",
        ));
    }
    if metadata.is_dir() {
        let meta = Meta {
            mode: dir_mode.unwrap_or(metadata.mode() & 0o7777),
            uid: owner.0,
            gid: owner.1,
        };
        if !dest.is_empty() {
            insert(plan, dest.clone(), EntryKind::Dir, meta, span.clone())?;
        }
        walker.walk(&absolute, b"", None)?;
        for (rel, kind, meta) in walker.out {
            insert(plan, join(&dest, &rel), kind, meta, span.clone())?;
        }
    } else {
        let name = absolute
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        let target = if dest_is_dir || dest.is_empty() {
            join(&dest, &name)
        } else {
            dest
        };
        let (kind, meta) = walker.leaf(&absolute, &metadata)?;
        insert(plan, target, kind, meta, span)?;
    }
    Ok(())
}

struct Walker<'a> {
    file: &'a DefinitionFile,
    context: &'a Context,
    excludes: &'a GlobSet,
    /// Exclude patterns without a `/` match a name at any depth, as in .gitignore.
    excludes_by_name: &'a GlobSet,
    owner: (u64, u64),
    file_mode: Option<u32>,
    dir_mode: Option<u32>,
    span: Range<usize>,
    /// (path relative to the walk's root, kind, meta), in walk order.
    out: Vec<(Vec<u8>, EntryKind, Meta)>,
    check_ignore: bool,
}

impl Walker<'_> {
    fn walk(
        &mut self,
        dir: &Path,
        rel: &[u8],
        matcher: Option<&globset::GlobMatcher>,
    ) -> Result<(), BuildError> {
        let io_err = |path: &Path, source| BuildError::Io {
            path: path.to_owned(),
            source,
        };
        let mut children: Vec<(Vec<u8>, fs::DirEntry)> = fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .map(|item| item.map(|i| (i.file_name().as_bytes().to_vec(), i)))
            .collect::<Result<_, _>>()
            .map_err(|e| io_err(dir, e))?;
        // Byte-wise: the order must not depend on the file system or the locale.
        children.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, item) in children {
            let path = item.path();
            let child_rel = join(rel, &name);
            // Relative to the open directory (fstatat, never following a symlink): a no-op
            // rebuild stats every file, and a full-path lookup walks every component again.
            let metadata = item.metadata().map_err(|e| io_err(&path, e))?;
            let is_dir = metadata.is_dir();
            if self.check_ignore && self.context.ignored(&path, is_dir) {
                continue;
            }
            if self
                .excludes
                .is_match(Path::new(OsStr::from_bytes(&child_rel)))
                || self
                    .excludes_by_name
                    .is_match(Path::new(OsStr::from_bytes(&name)))
            {
                continue;
            }
            if is_dir {
                // Under a glob only files are selected; the directories leading to them are
                // structure, not copied content, so they get dir_mode or 0755 rather than
                // whatever the host's umask left on them.
                let found = if matcher.is_some() {
                    0o755
                } else {
                    metadata.mode() & 0o7777
                };
                let meta = Meta {
                    mode: self.dir_mode.unwrap_or(found),
                    uid: self.owner.0,
                    gid: self.owner.1,
                };
                let mark = self.out.len();
                self.out.push((child_rel.clone(), EntryKind::Dir, meta));
                self.walk(&path, &child_rel, matcher)?;
                // With a glob, a directory is kept only if something below it matched.
                if matcher.is_some() && self.out.len() == mark + 1 {
                    self.out.truncate(mark);
                }
                continue;
            }
            if let Some(m) = matcher {
                let from_context = path.strip_prefix(&self.context.root).unwrap_or(&path);
                if !m.is_match(from_context) {
                    continue;
                }
            }
            let (kind, meta) = self.leaf(&path, &metadata)?;
            self.out.push((child_rel, kind, meta));
        }
        Ok(())
    }

    fn leaf(&self, path: &Path, metadata: &fs::Metadata) -> Result<(EntryKind, Meta), BuildError> {
        let ft = metadata.file_type();
        let (uid, gid) = self.owner;
        if ft.is_symlink() {
            let target = fs::read_link(path).map_err(|source| BuildError::Io {
                path: path.to_owned(),
                source,
            })?;
            let meta = Meta {
                mode: 0o777,
                uid,
                gid,
            };
            return Ok((
                EntryKind::Symlink(target.as_os_str().as_bytes().to_vec()),
                meta,
            ));
        }
        if !ft.is_file() {
            return Err(self.file.error(
                self.span.clone(),
                format!(
                    "{} is not a regular file, directory or symlink (devices, fifos and sockets cannot be copied)",
                    path.display()
                ),
                "exclude it with `exclude` or .imagoignore",
            ));
        }
        let meta = Meta {
            mode: self.file_mode.unwrap_or(metadata.mode() & 0o7777),
            uid,
            gid,
        };
        Ok((
            EntryKind::File {
                source: path.to_owned(),
                stamp: Stamp::of(metadata),
            },
            meta,
        ))
    }
}

fn join(base: &[u8], name: &[u8]) -> Vec<u8> {
    if base.is_empty() {
        return name.to_vec();
    }
    if name.is_empty() {
        return base.to_vec();
    }
    let mut out = Vec::with_capacity(base.len() + 1 + name.len());
    out.extend_from_slice(base);
    out.push(b'/');
    out.extend_from_slice(name);
    out
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// Splits `a/b/*.txt` into the fixed base `a/b` and the whole pattern; matches are placed below
/// the destination by their path under the base.
fn split_glob(pattern: &str) -> (&str, &str) {
    let mut base_end = 0;
    for (i, c) in pattern.char_indices() {
        if matches!(c, '*' | '?' | '[' | '{') {
            break;
        }
        if c == '/' {
            base_end = i;
        }
    }
    (&pattern[..base_end], pattern)
}

fn glob_set(file: &DefinitionFile, patterns: &[Spanned<String>]) -> Result<GlobSet, BuildError> {
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        let glob: Glob = GlobBuilder::new(p.get_ref())
            .literal_separator(true)
            .build()
            .map_err(|e| {
                file.error(
                    p.span(),
                    format!("invalid exclude glob {}: {e}", p.get_ref()),
                    "see globset syntax: *, ?, [..], {a,b}, **",
                )
            })?;
        builder.add(glob);
    }
    builder
        .build()
        .map_err(|e| BuildError::Internal(format!("building exclude set: {e}")))
}

/// Normalises an absolute path in the image to its layer form (no leading `/`). `..` may not
/// climb above `/`; an empty result means the root itself, allowed only for copy destinations.
pub fn image_path(
    file: &DefinitionFile,
    path: &Spanned<String>,
    allow_root: bool,
) -> Result<Vec<u8>, BuildError> {
    let text = path.get_ref();
    if !text.starts_with('/') {
        return Err(file.error(
            path.span(),
            format!("path {text} in the image must be absolute"),
            "start it with `/`",
        ));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(file.error(
                        path.span(),
                        format!("destination {text} is outside the image root"),
                        "remove the `..` components",
                    ));
                }
            }
            p if p.contains('\0') => {
                return Err(file.error(path.span(), "path contains a NUL byte", ""));
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() && !allow_root {
        return Err(file.error(
            path.span(),
            format!("{text} is the image root; name a path below it"),
            "",
        ));
    }
    Ok(parts.join("/").into_bytes())
}

/// Octal permission bits written as a string: `"0755"`, `"755"`, `"1777"`.
pub fn parse_mode(file: &DefinitionFile, mode: &Spanned<String>) -> Result<u32, BuildError> {
    let text = mode.get_ref().trim_start_matches("0o");
    match u32::from_str_radix(text, 8) {
        Ok(m) if m <= 0o7777 && !text.is_empty() => Ok(m),
        _ => Err(file.error(
            mode.span(),
            format!("invalid mode {:?}", mode.get_ref()),
            "write permission bits as an octal string, e.g. mode = \"0644\"",
        )),
    }
}

fn parse_owner(
    file: &DefinitionFile,
    owner: Option<&Spanned<String>>,
) -> Result<(u64, u64), BuildError> {
    let Some(owner) = owner else {
        return Ok((0, 0));
    };
    let text = owner.get_ref();
    let parsed = match text.split_once(':') {
        Some((u, g)) => u.parse().ok().zip(g.parse().ok()),
        None => text.parse().ok().map(|u| (u, u)),
    };
    parsed.ok_or_else(|| {
        file.error(
            owner.span(),
            format!("invalid owner {text:?}"),
            "use numeric ids, \"uid:gid\" or \"uid\": the build never looks up this machine's users",
        )
    })
}

fn meta(
    file: &DefinitionFile,
    owner: Option<&Spanned<String>>,
    mode: Option<&Spanned<String>>,
    default_mode: u32,
) -> Result<Meta, BuildError> {
    let (uid, gid) = parse_owner(file, owner)?;
    let mode = mode.map(|m| parse_mode(file, m)).transpose()?;
    Ok(Meta {
        mode: mode.unwrap_or(default_mode),
        uid,
        gid,
    })
}

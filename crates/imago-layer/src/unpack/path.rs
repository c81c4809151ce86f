//! Validation of the paths named inside a layer archive, before anything touches the disk.

/// Why an archive path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathProblem {
    Absolute,
    ParentComponent,
    Nul,
}

impl PathProblem {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            // Refused rather than stripped like GNU tar does: layer writers never emit them, and
            // an archive that does was not made for this unpacker, so guessing its meaning is
            // worse than saying no.
            PathProblem::Absolute => "absolute paths are not allowed",
            // Every `..` is refused, even one that would stay inside after lexical cleaning:
            // the kernel resolves `a/..` through `a` when `a` is a symlink, so the lexical and
            // the real meaning differ, and no layer writer needs `..`.
            PathProblem::ParentComponent => "`..` components are not allowed",
            PathProblem::Nul => "NUL bytes are not allowed in paths",
        }
    }
}

/// A path relative to the unpack root, made only of normal components (no empty, `.` or `..`
/// components, no NUL). The empty path is the root itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RelPath {
    /// The components joined by `/`: the key under which the layer remembers what it wrote.
    key: Vec<u8>,
    /// Byte offsets in `key` where each component ends.
    ends: Vec<usize>,
}

impl RelPath {
    /// Validates an archive path. `./` prefixes, repeated and trailing slashes are dropped, as
    /// every tar reader does.
    pub(crate) fn parse(raw: &[u8]) -> Result<RelPath, PathProblem> {
        if raw.first() == Some(&b'/') {
            return Err(PathProblem::Absolute);
        }
        if raw.contains(&0) {
            return Err(PathProblem::Nul);
        }
        let mut key = Vec::with_capacity(raw.len());
        let mut ends = Vec::new();
        for component in raw.split(|&b| b == b'/') {
            match component {
                b"" | b"." => {}
                b".." => return Err(PathProblem::ParentComponent),
                normal => {
                    if !key.is_empty() {
                        key.push(b'/');
                    }
                    key.extend_from_slice(normal);
                    ends.push(key.len());
                }
            }
        }
        Ok(RelPath { key, ends })
    }

    pub(crate) fn is_root(&self) -> bool {
        self.ends.is_empty()
    }

    pub(crate) fn key(&self) -> &[u8] {
        &self.key
    }

    /// The last component; empty for the root.
    pub(crate) fn file_name(&self) -> &[u8] {
        match self.ends.len() {
            0 => b"",
            1 => &self.key,
            n => &self.key[self.ends[n - 2] + 1..],
        }
    }

    /// The path without its last component (the root for a one-component path).
    pub(crate) fn parent(&self) -> RelPath {
        let mut ends = self.ends.clone();
        ends.pop();
        let len = ends.last().copied().unwrap_or(0);
        RelPath {
            key: self.key[..len].to_vec(),
            ends,
        }
    }

    /// Keys of the proper ancestors, nearest first, excluding the root.
    pub(crate) fn ancestor_keys(&self) -> impl Iterator<Item = &[u8]> {
        let n = self.ends.len().saturating_sub(1);
        self.ends[..n].iter().rev().map(|&end| &self.key[..end])
    }

    /// Keys of the ancestors and of the path itself, root-most first, excluding the root.
    pub(crate) fn prefix_keys(&self) -> impl Iterator<Item = &[u8]> {
        self.ends.iter().map(|&end| &self.key[..end])
    }

    /// The components, root-most first.
    pub(crate) fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.key.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }
}

/// Joins a child name under a key (the root's key is empty).
pub(crate) fn child_key(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        key.extend_from_slice(parent);
        key.push(b'/');
    }
    key.extend_from_slice(name);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(raw: &str) -> Result<String, PathProblem> {
        RelPath::parse(raw.as_bytes()).map(|p| String::from_utf8_lossy(p.key()).into_owned())
    }

    #[test]
    fn normalizes_harmless_spellings() {
        assert_eq!(key("./usr//bin/./sh"), Ok("usr/bin/sh".into()));
        assert_eq!(key("etc/"), Ok("etc".into()));
        assert_eq!(key("./"), Ok(String::new()));
        assert_eq!(key("."), Ok(String::new()));
        assert_eq!(key("..a/b..c/.d"), Ok("..a/b..c/.d".into()));
    }

    #[test]
    fn refuses_absolute_parent_and_nul() {
        assert_eq!(key("/etc/passwd"), Err(PathProblem::Absolute));
        assert_eq!(key("/"), Err(PathProblem::Absolute));
        assert_eq!(key("../x"), Err(PathProblem::ParentComponent));
        assert_eq!(key("a/../b"), Err(PathProblem::ParentComponent));
        assert_eq!(key("a/.."), Err(PathProblem::ParentComponent));
        assert_eq!(key("a\0b"), Err(PathProblem::Nul));
    }

    #[test]
    fn splits_parent_name_and_ancestors() -> Result<(), PathProblem> {
        let p = RelPath::parse(b"./a/bc/d/")?;
        assert_eq!(p.file_name(), b"d");
        assert_eq!(p.parent().key(), b"a/bc");
        assert_eq!(p.parent().file_name(), b"bc");
        assert_eq!(p.parent().parent().parent().key(), b"");
        assert!(p.parent().parent().parent().is_root());
        let ancestors: Vec<&[u8]> = p.ancestor_keys().collect();
        assert_eq!(ancestors, vec![&b"a/bc"[..], &b"a"[..]]);
        let prefixes: Vec<&[u8]> = p.prefix_keys().collect();
        assert_eq!(prefixes, vec![&b"a"[..], &b"a/bc"[..], &b"a/bc/d"[..]]);
        let components: Vec<&[u8]> = p.components().collect();
        assert_eq!(components, vec![&b"a"[..], &b"bc"[..], &b"d"[..]]);
        assert_eq!(child_key(b"", b"x"), b"x");
        assert_eq!(child_key(b"a", b"x"), b"a/x");
        Ok(())
    }
}

// SPDX-License-Identifier: GPL-2.0

//! ioctl request words (asm-generic `_IOC` encoding, as on x86), built
//! and taken apart, for the tests that send the dmirror driver commands
//! it does not know: other numbers, other type bytes, other sizes and
//! directions.

use hmm_dmirror_uapi::HMM_DMIRROR_CMD_SIZE;

pub const IOC_NONE: u32 = 0;
pub const IOC_WRITE: u32 = 1;
pub const IOC_READ: u32 = 2;
/// Largest size the 14-bit field holds.
pub const IOC_SIZE_MAX: usize = (1 << 14) - 1;

/// `_IOC(dir, ty, nr, size)`. `size` is masked to its 14 bits.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    ((dir & 3) << 30) | (((size & IOC_SIZE_MAX) as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

pub const fn ioc_dir(cmd: u32) -> u32 {
    cmd >> 30
}

pub const fn ioc_type(cmd: u32) -> u8 {
    (cmd >> 8) as u8
}

pub const fn ioc_nr(cmd: u32) -> u8 {
    cmd as u8
}

pub const fn ioc_size(cmd: u32) -> usize {
    ((cmd >> 16) & IOC_SIZE_MAX as u32) as usize
}

/// The dmirror type byte.
pub const DMIRROR_TYPE: u8 = b'H';

/// `_IOWR('H', nr, struct hmm_dmirror_cmd)`: a well-formed dmirror word.
pub const fn dmirror(nr: u8) -> u32 {
    ioc(IOC_READ | IOC_WRITE, DMIRROR_TYPE, nr, HMM_DMIRROR_CMD_SIZE)
}

/// Whether `cmd` is one of the ten commands the driver implements
/// (numbers 0 to 9, full word compared, as C's switch does).
pub fn is_dmirror_command(cmd: u32) -> bool {
    (0..=9).any(|nr| dmirror(nr) == cmd)
}

/// Type bytes used for "another driver's command" words. None of them is
/// one the VFS answers itself before the driver sees the call: 'T'
/// (FIOCLEX, FIONBIO, FIONREAD...), 'X' (FIFREEZE, FS_IOC_FSGETXATTR),
/// 'f' (FS_IOC_GETFLAGS, FIEMAP), 0x94 (FICLONE), 0x15 (FS_IOC_GETFSUUID)
/// and 0 (FIBMAP, FIGETBSZ) are left out.
pub const OTHER_TYPES: &[u8] = &[0x01, b'A', b'G', b'h', 0x7f, 0xAA, 0xfe, 0xff];

/// Sizes other than `sizeof(struct hmm_dmirror_cmd)` (40).
pub const WRONG_SIZES: &[usize] = &[0, 8, 39, 41, 4096, IOC_SIZE_MAX];

/// One malformed variant of a dmirror command: a label and the word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    pub label: String,
    pub cmd: u32,
}

/// The wrong-size and wrong-direction encodings of command `nr`: every
/// size in [`WRONG_SIZES`] with `_IOWR`, then `_IO`, `_IOR` and `_IOW` with
/// the right size, and `_IOC(0, ..., 40)`.
pub fn wrong_encodings(nr: u8) -> Vec<Variant> {
    let mut v: Vec<Variant> = WRONG_SIZES
        .iter()
        .map(|&size| Variant {
            label: format!("_IOWR('H', {nr}, {size} bytes)"),
            cmd: ioc(IOC_READ | IOC_WRITE, DMIRROR_TYPE, nr, size),
        })
        .collect();
    let size = HMM_DMIRROR_CMD_SIZE;
    for (label, dir, size) in [
        ("_IO", IOC_NONE, 0),
        ("_IOR", IOC_READ, size),
        ("_IOW", IOC_WRITE, size),
        ("_IOC(NONE, 40)", IOC_NONE, size),
    ] {
        v.push(Variant {
            label: format!("{label}('H', {nr})"),
            cmd: ioc(dir, DMIRROR_TYPE, nr, size),
        });
    }
    v
}

/// Command `nr` (0 to 9) under each of [`OTHER_TYPES`].
pub fn other_types(nr: u8) -> Vec<Variant> {
    OTHER_TYPES
        .iter()
        .map(|&ty| Variant {
            label: format!("_IOWR({ty:#04x}, {nr}, 40)"),
            cmd: ioc(IOC_READ | IOC_WRITE, ty, nr, HMM_DMIRROR_CMD_SIZE),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmm_dmirror_uapi::{
        HMM_DMIRROR_READ, HMM_DMIRROR_READ_UNLOCKABLE, HMM_DMIRROR_SNAPSHOT, HMM_DMIRROR_WRITE,
    };

    #[test]
    fn encodes_the_uapi_numbers() {
        assert_eq!(dmirror(0), HMM_DMIRROR_READ);
        assert_eq!(dmirror(1), HMM_DMIRROR_WRITE);
        assert_eq!(dmirror(4), HMM_DMIRROR_SNAPSHOT);
        assert_eq!(dmirror(9), HMM_DMIRROR_READ_UNLOCKABLE);
        assert_eq!(dmirror(0), 0xc028_4800);
        // Known words from other headers.
        assert_eq!(ioc(IOC_NONE, b'T', 0x51, 0), 0x5451); // FIOCLEX
        assert_eq!(ioc(IOC_READ | IOC_WRITE, 0xAA, 0x3F, 24), 0xc018_aa3f); // UFFDIO_API
        assert_eq!(ioc(IOC_READ, b'f', 1, 8), 0x8008_6601); // FS_IOC_GETFLAGS
    }

    #[test]
    fn decodes_what_it_encodes() {
        for (dir, ty, nr, size) in [(3, b'H', 9, 40), (0, 0xff, 255, 0), (2, 1, 0, IOC_SIZE_MAX)] {
            let c = ioc(dir, ty, nr, size);
            assert_eq!(
                (ioc_dir(c), ioc_type(c), ioc_nr(c), ioc_size(c)),
                (dir, ty, nr, size)
            );
        }
        // The size field is 14 bits: a larger size does not spill over.
        assert_eq!(ioc(0, 0, 0, IOC_SIZE_MAX + 1), 0);
    }

    #[test]
    fn malformed_words_are_not_commands() {
        for nr in 0..=9 {
            assert!(is_dmirror_command(dmirror(nr)));
            let all: Vec<Variant> = wrong_encodings(nr)
                .into_iter()
                .chain(other_types(nr))
                .collect();
            assert_eq!(all.len(), WRONG_SIZES.len() + 4 + OTHER_TYPES.len());
            for v in &all {
                assert!(!is_dmirror_command(v.cmd), "{} = {:#x}", v.label, v.cmd);
                assert_eq!(ioc_nr(v.cmd), nr, "{}", v.label);
            }
            let mut words: Vec<u32> = all.iter().map(|v| v.cmd).collect();
            words.sort_unstable();
            words.dedup();
            assert_eq!(words.len(), all.len(), "duplicate words for nr {nr}");
        }
        for nr in 10..=255u8 {
            assert!(!is_dmirror_command(dmirror(nr)));
        }
        assert!(!OTHER_TYPES.contains(&DMIRROR_TYPE));
        for vfs in [b'T', b'X', b'f', 0x94, 0x15, 0] {
            assert!(!OTHER_TYPES.contains(&vfs));
        }
    }
}

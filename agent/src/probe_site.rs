//! Where in a C library's `write` the TorchServe workers' uprobe goes (docs/decisions.md R39).
//!
//! A uprobe replaces one instruction with a breakpoint. When it is hit, the kernel runs the BPF
//! program, then either emulates the replaced instruction (on x86: relative jumps, relative calls
//! and conditional branches) or copies it to a page of the process and single-steps it there.
//!
//! On this machine kind the single step is what costs. Measured with a loop of 64-byte writes to
//! /dev/null (2026-12-04, 2 vCPU VM):
//! - no probe: 197 ns a call;
//! - a probe on glibc's `write` itself (a `cmpb`, single-stepped): 9.5 µs;
//! - a probe on its first conditional branch, seven bytes on (emulated): 0.93 µs.
//!
//! So the probe goes on the first instruction of the function's straight-line start that the
//! kernel emulates, provided nothing before it writes the argument registers the program reads
//! (rdi, rsi, rdx: fd, buffer, count). Every call runs that instruction: no branch comes before
//! it. When there is no such instruction (another libc, another architecture), the probe goes on
//! the function's first byte, which is correct, only slower.
//!
//! Hand-written on top of iced-x86 (which knows instruction lengths and register writes): the
//! kernel's list of emulated instructions (arch/x86/kernel/uprobes.c, `branch_setup_xol_ops`)
//! is what no crate describes.

use iced_x86::{Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess, Register};

/// How many instructions from the start are looked at.
const MAX_INSTRUCTIONS: usize = 16;

/// The offset into `code` (a function's first bytes, x86-64) of the first instruction that the
/// kernel emulates when a uprobe is hit there, if it comes before any write to rdi, rsi or rdx and
/// before any other change of control flow.
pub fn emulated_offset(code: &[u8]) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    for _ in 0..MAX_INSTRUCTIONS {
        if !decoder.can_decode() {
            return None;
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        let at = usize::try_from(insn.ip()).ok()?;
        if emulated(code.get(at..at + insn.len())?) {
            return Some(insn.ip());
        }
        if insn.flow_control() != FlowControl::Next {
            return None;
        }
        let writes_an_argument = info.info(&insn).used_registers().iter().any(|r| {
            matches!(
                r.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) && matches!(
                r.register().full_register(),
                Register::RDI | Register::RSI | Register::RDX
            )
        });
        if writes_an_argument {
            return None;
        }
    }
    None
}

/// Whether the kernel emulates the x86 instruction `bytes` at a uprobe: `jmp rel8/rel32`,
/// `call rel32`, `jcc rel8/rel32`, with no prefix.
fn emulated(bytes: &[u8]) -> bool {
    match bytes {
        [0xeb, _] | [0xe9, _, _, _, _] | [0xe8, _, _, _, _] => true,
        [op, _] => (0x70..=0x7f).contains(op),
        [0x0f, op, _, _, _, _] => (0x80..=0x8f).contains(op),
        _ => false,
    }
}

/// The first bytes of the function `symbol` in the ELF file `elf`, as mapped (its dynamic or
/// static symbol table), with its length capped at `max`.
pub fn function_bytes(elf: &[u8], symbol: &str, max: usize) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

    let file = object::File::parse(elf).context("parsing the ELF file")?;
    let sym = file
        .dynamic_symbols()
        .chain(file.symbols())
        .find(|s| s.name() == Ok(symbol) && s.kind() == SymbolKind::Text && s.address() != 0)
        .with_context(|| format!("no function symbol `{symbol}`"))?;
    let section = sym
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .with_context(|| format!("`{symbol}` is in no section"))?;
    let len = if sym.size() == 0 {
        max as u64
    } else {
        sym.size().min(max as u64)
    };
    let bytes = section
        .data_range(sym.address(), len)
        .context("reading the section")?
        .with_context(|| format!("`{symbol}` lies outside its section"))?;
    Ok(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_2_36_write_is_probed_at_its_first_branch() {
        // Debian 12's libc.so.6 `write`: cmpb $0,__libc_single_threaded(%rip); je; mov $1,%eax; syscall
        let code = [
            0x80, 0x3d, 0x91, 0x32, 0x0e, 0x00, 0x00, // cmpb
            0x74, 0x17, // je
            0xb8, 0x01, 0x00, 0x00, 0x00, // mov $1,%eax
            0x0f, 0x05, // syscall
        ];
        assert_eq!(emulated_offset(&code), Some(7));
    }

    #[test]
    fn older_glibc_write_is_probed_after_its_thread_check() {
        // glibc 2.31: endbr64; mov %fs:0x18,%eax; test %eax,%eax; jne
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, // endbr64
            0x64, 0x8b, 0x04, 0x25, 0x18, 0x00, 0x00, 0x00, // mov %fs:0x18,%eax
            0x85, 0xc0, // test %eax,%eax
            0x75, 0x14, // jne
        ];
        assert_eq!(emulated_offset(&code), Some(14));
    }

    #[test]
    fn a_branch_after_an_argument_changes_is_not_taken() {
        // mov %rdx,%rcx is fine; mov %edi,%esi (writes rsi) is not: the probe would read a changed
        // argument.
        let moved = [0x48, 0x89, 0xd1, 0x89, 0xfe, 0x74, 0x02];
        assert_eq!(emulated_offset(&moved), None);
        let kept = [0x48, 0x89, 0xd1, 0x74, 0x02];
        assert_eq!(emulated_offset(&kept), Some(3));
    }

    #[test]
    fn no_emulated_instruction_before_other_control_flow() {
        // mov $1,%eax; syscall; ret: nothing emulated before the syscall.
        let code = [0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xc3];
        assert_eq!(emulated_offset(&code), None);
        // An indirect jump first.
        assert_eq!(emulated_offset(&[0xff, 0xe0]), None);
        // A prefixed branch is not one the kernel emulates; nor is junk.
        assert_eq!(emulated_offset(&[0x66, 0x74, 0x02]), None);
        assert_eq!(emulated_offset(&[]), None);
        assert_eq!(emulated_offset(&[0x0f]), None);
    }

    #[test]
    fn calls_and_jumps_are_emulated() {
        assert_eq!(emulated_offset(&[0xe9, 0, 0, 0, 0]), Some(0));
        assert_eq!(emulated_offset(&[0x90, 0xe8, 0, 0, 0, 0]), Some(1));
        assert_eq!(emulated_offset(&[0x0f, 0x84, 0, 0, 0, 0]), Some(0));
    }

    #[test]
    fn this_machines_libc_write_has_an_emulated_site() {
        // Debian's glibc, as TorchServe's workers here map it.
        let path = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let elf = std::fs::read(path).expect("reading libc");
        let code = function_bytes(&elf, "write", 64).expect("write's bytes");
        assert!(code.len() >= 8, "{code:x?}");
        let at = emulated_offset(&code).expect("an emulated instruction");
        assert!(at < 32, "{at}");
    }

    #[test]
    fn a_missing_symbol_is_a_clear_error() {
        let elf = std::fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6").expect("reading libc");
        let e = function_bytes(&elf, "no_such_function_here", 64).expect_err("no symbol");
        assert!(format!("{e:#}").contains("no_such_function_here"), "{e:#}");
        let e = function_bytes(b"not an elf", "write", 64).expect_err("junk");
        assert!(format!("{e:#}").contains("ELF"), "{e:#}");
    }
}

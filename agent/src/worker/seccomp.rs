//! The system calls a session is refused (EPERM), on top of the worker unit's own filter:
//! what no notebook needs and what has been the way out of sandboxes (kernel keyrings, bpf,
//! perf, userfaultfd, io_uring, ptrace, mounts and new namespaces once inside, handles to files
//! by inode, module and kexec calls). Built with seccompiler (rust-vmm's, used by Firecracker)
//! rather than hand-written BPF; `clone3` answers ENOSYS, so the C library falls back to
//! `clone`, whose namespace flags are checked (clone3 passes them in memory, out of a
//! filter's reach).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// Refused outright.
const DENIED: &[i64] = &[
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    libc::SYS_fanotify_init,
];

/// `clone` flags that make namespaces: refused.
const NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

fn arch() -> seccompiler::TargetArch {
    std::env::consts::ARCH
        .try_into()
        .expect("seccompiler supports this architecture (x86_64, aarch64, riscv64)")
}

/// The session's filters, in the order they are installed: the EPERM one, then clone3's ENOSYS.
/// Compiled once: every process of every session gets the same.
pub fn filters() -> &'static [BpfProgram] {
    static FILTERS: std::sync::OnceLock<Vec<BpfProgram>> = std::sync::OnceLock::new();
    FILTERS.get_or_init(compile)
}

fn compile() -> Vec<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|nr| (*nr, Vec::new())).collect();
    let clone = NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            SeccompRule::new(vec![
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(*flag),
                    *flag,
                )
                .expect("a valid condition"),
            ])
            .expect("a valid rule")
        })
        .collect();
    rules.insert(libc::SYS_clone, clone);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch(),
    )
    .expect("a valid filter");
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch(),
    )
    .expect("a valid filter");
    [deny, clone3]
        .into_iter()
        .map(|f| f.try_into().expect("the filter compiles"))
        .collect()
}

/// In the child, after no_new_privs: installs the filters. Only system calls.
pub fn apply(filters: &[BpfProgram]) -> std::io::Result<()> {
    for f in filters {
        seccompiler::apply_filter(f).map_err(|e| match e {
            seccompiler::Error::Seccomp(e) | seccompiler::Error::Prctl(e) => e,
            _ => std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_filters_compile() {
        let f = super::filters();
        assert_eq!(f.len(), 2);
        assert!(f[0].len() > super::DENIED.len(), "a jump per denied call");
    }
}

//! Reads a process's resident memory from `/proc/PID/status` (`VmRSS`).

/// Resident set size in KiB, or `None` when the process or the field is not there.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&status)
}

fn parse_vmrss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_vmrss() {
        let s = "Name:\tx\nVmPeak:\t  10 kB\nVmRSS:\t    2048 kB\nThreads: 3\n";
        assert_eq!(super::parse_vmrss(s), Some(2048));
        assert_eq!(super::parse_vmrss("Name: x\n"), None);
        assert!(super::rss_kib(std::process::id()).is_some());
    }
}

//! Raw output, usable from a signal handler: allocation-free formatting into a fixed buffer, one
//! `write` to stderr, and ending the process at once.

/// Writes text and numbers into a byte buffer, truncating when full.
pub struct RawWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> RawWriter<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        RawWriter { buf, len: 0 }
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        self
    }

    pub fn num(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        // SAFETY: ASCII digits are valid UTF-8.
        self.str(unsafe { std::str::from_utf8_unchecked(&digits[i..]) })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Writes bytes to stderr with one raw write.
pub fn write_stderr(b: &[u8]) {
    // SAFETY: writing a valid buffer to fd 2.
    unsafe { libc::write(2, b.as_ptr().cast(), b.len()) };
}

/// Ends the process at once with `status`, like `_exit`, without going through the exported
/// `_exit` symbol (the shim interposes that one to leave the job).
pub fn exit_now(status: i32) -> ! {
    loop {
        // SAFETY: exit_group ends every thread of the process; it does not return.
        unsafe { libc::syscall(libc::SYS_exit_group, status as libc::c_long) };
    }
}

#[cfg(test)]
mod tests {
    use super::RawWriter;

    #[test]
    fn writes_and_truncates() {
        let mut b = [0u8; 12];
        let mut w = RawWriter::new(&mut b);
        w.str("rank ").num(0).str(" x").num(12345);
        assert_eq!(w.as_bytes(), b"rank 0 x1234");
    }
}

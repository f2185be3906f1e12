; /bin/reseed of tests/integration/test_vmgenid.py's guest: ioctl(open("/dev/urandom"), RNDRESEEDCRNG),
; a forced crng reseed (no libc in that guest, so a flat static ELF). Exit status: 0, or -errno.
BITS 64
org 0x400000
ehdr:
  db 0x7f, "ELF", 2, 1, 1, 0
  times 8 db 0
  dw 2, 0x3e
  dd 1
  dq _start, phdr - $$, 0
  dd 0
  dw ehdrsize, phdrsize, 1, 0, 0, 0
ehdrsize equ $ - ehdr
phdr:
  dd 1, 5
  dq 0, $$, $$, filesize, filesize, 0x1000
phdrsize equ $ - phdr
_start:
  mov eax, 2
  lea rdi, [rel path]
  xor esi, esi
  syscall
  mov edi, eax
  mov eax, 16
  mov esi, 0x5207
  xor edx, edx
  syscall
  mov edi, eax
  neg edi
  mov eax, 60
  syscall
path: db "/dev/urandom", 0
filesize equ $ - $$

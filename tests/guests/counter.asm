; cbsd test guest: a 512-byte boot sector.
;
; Prints on COM1, every two BIOS ticks (~110 ms):   n=<count> disk=<value> OK|BAD
;   count - a counter held only in RAM; restarts at 0 on every boot (a "BOOT" line is printed)
;   value - the counter last written to disk sector LBA 1, read back through the BIOS
;   OK    - the disk holds exactly what RAM says was written last; BAD otherwise.
; After the line is printed the new count is written to the disk. A restore whose disk does
; not match its memory therefore prints BAD on its first line.
;
; The word at offset 0x1FC (FILL_MIB) asks the guest to fill that many MiB of RAM above 1 MiB
; with pseudo-random data at boot (unreal mode), for large-state tests and benchmarks. The word
; at 0x1FA (CHURN_PAGES) then has it rewrite that many 4 KiB pages of the filled RAM with new
; random data after each line, round and round (RAM that keeps changing, for dedup benchmarks).

bits 16
org 0x7c00

BUF   equ 0x7e00        ; 512-byte sector buffer
COUNT equ 0x8000        ; dword: RAM counter
LAST  equ 0x8004        ; dword: value RAM believes is on disk
DRIVE equ 0x8008        ; byte: BIOS boot drive
RNG   equ 0x800c        ; dword: xorshift32 state, carried from the fill into the churn
CPTR  equ 0x8010        ; dword: the churn's next offset into the filled RAM

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    mov [DRIVE], dl
    mov dword [COUNT], 0

    cmp word [fill_mib], 0
    je .nofill
    call fill
.nofill:
    call read_disk
    mov [LAST], eax
    mov si, s_boot
    call puts                   ; clobbers al
    mov eax, [LAST]
    call putnum
    mov si, s_crlf
    call puts

main_loop:
    mov bx, [0x46c]
.wait:
    hlt
    mov ax, [0x46c]
    sub ax, bx
    cmp ax, 2
    jb .wait

    call read_disk
    push eax
    inc dword [COUNT]
    mov si, s_n
    call puts
    mov eax, [COUNT]
    call putnum
    mov si, s_disk
    call puts
    pop eax
    call putnum
    mov si, s_ok
    cmp eax, [LAST]
    je .print
    mov si, s_bad
.print:
    call puts

    mov eax, [COUNT]
    mov [BUF], eax
    mov ah, 3
    call disk_io
    mov eax, [COUNT]
    mov [LAST], eax
    call churn
    jmp main_loop

churn:                      ; rewrite churn_pages pages at CPTR (fs is flat from the fill)
    movzx ecx, word [churn_pages]
    shl ecx, 10
    jz .done
    mov edi, [CPTR]
    mov eax, [RNG]
    call rewrite
.done:
    ret

rewrite:                    ; ecx dwords of xorshift32(eax) from offset edi of the filled RAM,
    movzx ebx, word [fill_mib]  ; wrapping at its end; leaves CPTR and RNG where it stopped
    shl ebx, 20
.next:
    cmp edi, ebx            ; checked before the write: CPTR is not zeroed by a warm reboot
    jb .inside
    xor edi, edi
.inside:
    mov edx, eax            ; xorshift32 inline: a call per dword would slow TCG's fill
    shl edx, 13
    xor eax, edx
    mov edx, eax
    shr edx, 17
    xor eax, edx
    mov edx, eax
    shl edx, 5
    xor eax, edx
    mov [fs:edi+0x100000], eax
    add edi, 4
    dec ecx
    jnz .next
    mov [CPTR], edi
    mov [RNG], eax
    ret

read_disk:                  ; -> eax = dword at the start of LBA 1
    mov ah, 2
    call disk_io
    mov eax, [BUF]
    ret

disk_io:                    ; ah = 2 (read) or 3 (write) one sector: C0 H0 S2 = LBA 1
    mov al, 1
    mov cx, 2
    xor dh, dh
    mov dl, [DRIVE]
    mov bx, BUF
    int 0x13
    ret

putnum:                     ; print eax in decimal
    pushad
    mov ebx, 10
    xor cx, cx
.div:
    xor edx, edx
    div ebx
    push dx
    inc cx
    test eax, eax
    jnz .div
.out:
    pop ax
    add al, '0'
    call putc
    loop .out
    popad
    ret

puts:                       ; print the NUL-terminated string at si
    lodsb
    test al, al
    jz .done
    call putc
    jmp puts
.done:
    ret

putc:                       ; al -> COM1, waiting for the transmitter to be empty
    push dx
    push ax
    mov dx, 0x3fd
.busy:
    in al, dx
    test al, 0x20
    jz .busy
    pop ax
    mov dx, 0x3f8
    out dx, al
    pop dx
    ret

fill:                       ; unreal mode: flat FS, then xorshift32 over fill_mib MiB at 1 MiB
    in al, 0x92
    or al, 2
    and al, 0xfe
    out 0x92, al
    cli
    lgdt [gdtr]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    jmp $+2
    mov bx, 8
    mov fs, bx
    and al, 0xfe
    mov cr0, eax
    sti
    movzx ecx, word [fill_mib]
    shl ecx, 18
    xor edi, edi
    mov eax, 0x12345678
    call rewrite
    mov si, s_filled
    call puts
    ret

gdtr:
    dw gdt_end - gdt - 1
    dd gdt
gdt:
    dq 0
    dq 0x00cf92000000ffff
gdt_end:

s_boot:   db "BOOT disk=", 0
s_n:      db "n=", 0
s_disk:   db " disk=", 0
s_ok:     db " OK", 13, 10, 0
s_bad:    db " BAD", 13, 10, 0
s_crlf:   db 13, 10, 0
s_filled: db "FILLED", 13, 10, 0

times 0x1fa - ($ - $$) db 0
churn_pages: dw 0
fill_mib: dw 0
dw 0xaa55

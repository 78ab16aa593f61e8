import Engine
import Testing

@Suite("VMShape: the machine a live backup recorded")
struct VMShapeTests {
    @Test("a q35 VM with 2 CPUs and 512 MiB gives -machine q35 -m 512 -smp 2; --memory wins")
    func q35() {
        let config = #"{"cmdline":["qemu-system-x86_64"],"cpus":2,"machine":"pc-q35-8.2-machine","memory":536870912,"disks":[]}"#
        let shape = VMShape(vmConfig: config)
        #expect(shape == VMShape(machine: "q35", cpus: 2, memoryMiB: 512))
        #expect(shape.qemuArguments(memoryOverride: nil) == ["-machine", "q35", "-m", "512", "-smp", "2"])
        #expect(shape.qemuArguments(memoryOverride: 2048) == ["-machine", "q35", "-m", "2048", "-smp", "2"])
        #expect(shape.summary == "2 CPUs, 512 MiB, q35")
    }

    @Test("i440fx types map to pc; unknown types, odd sizes and garbage are left out, not guessed")
    func familiesAndGarbage() {
        #expect(VMShape(vmConfig: #"{"machine":"pc-i440fx-7.2-machine","cpus":1}"#) == VMShape(machine: "pc", cpus: 1))
        #expect(VMShape(vmConfig: #"{"machine":"virt-8.0-machine","memory":1000,"cpus":0}"#).isEmpty)
        #expect(VMShape(vmConfig: "not json").isEmpty)
        #expect(VMShape(vmConfig: nil).isEmpty)
        #expect(VMShape(vmConfig: "[1,2]").isEmpty)
        // Nothing recorded: the old defaults.
        #expect(VMShape().qemuArguments(memoryOverride: nil) == ["-machine", "q35", "-m", "1024"])
    }
}

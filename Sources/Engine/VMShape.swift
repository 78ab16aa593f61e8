import Foundation

/// The machine a live backup recorded (`Manifest.vmConfig`, written by `LiveVM.configuration`):
/// machine family, CPU count and memory, so that an instant restore starts an equivalent VM.
/// Every field is optional: an image backup records nothing, and a value Cairn cannot use (an
/// unknown machine family, a memory size that is not whole MiB) is left out rather than guessed.
package struct VMShape: Equatable, Sendable {
    /// `q35` or `pc`: the family of the recorded machine type (`pc-q35-8.2-machine` -> q35).
    /// The exact versioned type is not reused: the QEMU that restores may not have it.
    package var machine: String?
    package var cpus: Int?
    package var memoryMiB: Int?

    package init(machine: String? = nil, cpus: Int? = nil, memoryMiB: Int? = nil) {
        self.machine = machine
        self.cpus = cpus
        self.memoryMiB = memoryMiB
    }

    /// Reads the recorded configuration; an absent or unreadable one gives an empty shape.
    package init(vmConfig: String?) {
        self.init()
        guard let text = vmConfig, let object = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else { return }
        if let type = object["machine"] as? String {
            if type.contains("q35") {
                machine = "q35"
            } else if type.contains("i440fx") || type == "pc" || type.hasPrefix("pc-") {
                machine = "pc"
            }
        }
        if let n = (object["cpus"] as? NSNumber)?.intValue, (1...1024).contains(n) { cpus = n }
        if let bytes = (object["memory"] as? NSNumber)?.int64Value, bytes > 0, bytes % (1 << 20) == 0, bytes <= 1 << 42 {
            memoryMiB = Int(bytes >> 20)
        }
    }

    package var isEmpty: Bool { machine == nil && cpus == nil && memoryMiB == nil }

    /// QEMU arguments for the machine: recorded values, then `defaults` for what is missing;
    /// `memoryOverride` (the user's `--memory`) wins over both.
    package func qemuArguments(memoryOverride: Int?, defaultMachine: String = "q35", defaultMemoryMiB: Int = 1024) -> [String] {
        var args = ["-machine", machine ?? defaultMachine, "-m", "\(memoryOverride ?? memoryMiB ?? defaultMemoryMiB)"]
        if let cpus { args += ["-smp", "\(cpus)"] }
        return args
    }

    /// "2 CPUs, 512 MiB, q35" for messages; empty when nothing was recorded.
    package var summary: String {
        [cpus.map { "\($0) CPU\($0 == 1 ? "" : "s")" }, memoryMiB.map { "\($0) MiB" }, machine].compactMap { $0 }.joined(separator: ", ")
    }
}

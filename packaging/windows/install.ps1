<#
.SYNOPSIS
    Install or remove the crowdd Windows service.

.DESCRIPTION
    Run from an elevated PowerShell in this directory:

        .\install.ps1                      # pip install this checkout, register and start the service
        .\install.ps1 -Source C:\dl\crowdd-0.1.0-py3-none-any.whl   # ... from a built wheel instead
        .\install.ps1 -User alice          # ... and let alice control it (group "crowdd")
        .\install.ps1 -Uninstall           # stop and remove the service (keeps the data)
        .\install.ps1 -Uninstall -Purge    # ... and delete %ProgramData%\crowdd

    The service runs as NT AUTHORITY\LocalService at idle priority; its files live in
    %ProgramData%\crowdd. Its control endpoint is loopback TCP with a token in
    %ProgramData%\crowdd\run\control.token, readable only by SYSTEM, Administrators, the service
    and members of the local group "crowdd":  crowdd status --root $env:ProgramData\crowdd
#>
[CmdletBinding()]
param(
    [switch]$Uninstall,
    [switch]$Purge,
    [string]$Python = "",
    [string]$Root = (Join-Path $env:ProgramData "crowdd"),
    [string[]]$User = @(),
    # a wheel (python -m build --wheel) or a checkout; default: the checkout this script is in
    [string]$Source = "",
    [switch]$SkipPip,
    [switch]$Firewall
)

$ErrorActionPreference = "Stop"
$ServiceName = "crowdd"
$GroupName = "crowdd"
$Account = "NT AUTHORITY\LocalService"

function Assert-Admin {
    $id = [Security.Principal.WindowsIdentity]::GetCurrent()
    if (-not (New-Object Security.Principal.WindowsPrincipal $id).IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
        throw "run this script from an elevated PowerShell (Run as administrator)"
    }
}

function Resolve-Python {
    if ($Python) { return (Resolve-Path $Python).Path }
    $cmd = Get-Command python.exe -ErrorAction SilentlyContinue
    if (-not $cmd) { throw "python.exe not found: install Python 3.11+ for all users, or pass -Python C:\path\to\python.exe" }
    return $cmd.Source
}

function Invoke-Checked([string]$What, [scriptblock]$Block) {
    & $Block
    if ($LASTEXITCODE -ne 0) { throw "$What failed (exit code $LASTEXITCODE)" }
}

function Set-DirAcl([string]$Path, [string[]]$Rules) {
    # Rules: "IDENTITY:RIGHTS" with RIGHTS F (full), M (modify), RX (read/execute)
    Invoke-Checked "icacls $Path" { icacls $Path /inheritance:r /grant:r "*S-1-5-18:(OI)(CI)F" "*S-1-5-32-544:(OI)(CI)F" | Out-Null }
    foreach ($r in $Rules) {
        $id, $rights = $r -split ":", 2
        Invoke-Checked "icacls $Path" { icacls $Path /grant:r "${id}:(OI)(CI)$rights" | Out-Null }
    }
}

Assert-Admin
$py = Resolve-Python
$bin = Join-Path $Root "bin"
$serviceScript = Join-Path $bin "crowdd_service.py"

if ($Uninstall) {
    $svc = Get-Service -Name $ServiceName -ErrorAction SilentlyContinue
    if ($svc) {
        if ($svc.Status -ne "Stopped") { Stop-Service -Name $ServiceName -Force }
        if (Test-Path $serviceScript) {
            Invoke-Checked "service removal" { & $py $serviceScript remove }
        } else {
            Invoke-Checked "sc.exe delete" { sc.exe delete $ServiceName | Out-Null }
        }
        Write-Host "removed the $ServiceName service"
    } else {
        Write-Host "no $ServiceName service installed"
    }
    Get-NetFirewallRule -DisplayName "crowdd*" -ErrorAction SilentlyContinue | Remove-NetFirewallRule
    if ($Purge) {
        if (Test-Path $Root) { Remove-Item -Recurse -Force $Root; Write-Host "deleted $Root" }
        if (Get-LocalGroup -Name $GroupName -ErrorAction SilentlyContinue) { Remove-LocalGroup -Name $GroupName }
    }
    exit 0
}

function Resolve-Source {
    # crowdd is not on a package index: install it from a wheel or a checkout
    if ($Source) {
        if (-not (Test-Path $Source)) { throw "-Source ${Source}: no such wheel or directory" }
        return (Resolve-Path $Source).Path
    }
    $checkout = (Resolve-Path (Join-Path $PSScriptRoot "..\..")).Path
    if (-not (Test-Path (Join-Path $checkout "pyproject.toml"))) {
        throw "no checkout around $PSScriptRoot: pass -Source C:\path\to\crowdd-VERSION-py3-none-any.whl (or a checkout)"
    }
    return $checkout
}

if (-not $SkipPip) {
    $src = Resolve-Source
    Invoke-Checked "pip install $src" { & $py -m pip install --upgrade $src pywin32 }
}
# pywin32 registers pythonservice.exe and its DLLs machine-wide
& $py -m pywin32_postinstall -install -quiet 2>$null
if ($LASTEXITCODE -ne 0) {
    $post = Join-Path (Split-Path $py) "Scripts\pywin32_postinstall.py"
    Invoke-Checked "pywin32_postinstall" { & $py $post -install -quiet }
}

# files: ProgramData\crowdd\{bin,state,cache,log,run}
foreach ($d in @($Root, $bin, "state", "cache", "log", "run")) {
    $p = if ([IO.Path]::IsPathRooted($d)) { $d } else { Join-Path $Root $d }
    New-Item -ItemType Directory -Force -Path $p | Out-Null
}
if (-not (Get-LocalGroup -Name $GroupName -ErrorAction SilentlyContinue)) {
    New-LocalGroup -Name $GroupName -Description "May control the crowdd service" | Out-Null
}
foreach ($u in $User) {
    if (-not (Get-LocalGroupMember -Group $GroupName -Member $u -ErrorAction SilentlyContinue)) {
        Add-LocalGroupMember -Group $GroupName -Member $u
    }
}
Set-DirAcl $Root @("*S-1-5-19:M", "${GroupName}:RX")               # S-1-5-19 = LocalService
Set-DirAcl (Join-Path $Root "run") @("*S-1-5-19:M", "${GroupName}:RX")  # the control token
Set-DirAcl $bin @("*S-1-5-19:RX", "${GroupName}:RX")

Copy-Item -Force (Join-Path $PSScriptRoot "service.py") $serviceScript

$existing = Get-Service -Name $ServiceName -ErrorAction SilentlyContinue
if ($existing) {
    if ($existing.Status -ne "Stopped") { Stop-Service -Name $ServiceName -Force }
    Invoke-Checked "service update" { & $py $serviceScript --startup auto update }
} else {
    Invoke-Checked "service install" { & $py $serviceScript --startup auto install }
}
Invoke-Checked "sc.exe config" { sc.exe config $ServiceName obj= $Account password= "" | Out-Null }
# restart after a crash or a non-zero exit; reset the failure count after a day
Invoke-Checked "sc.exe failure" { sc.exe failure $ServiceName reset= 86400 actions= restart/60000/restart/60000/""/0 | Out-Null }
Invoke-Checked "sc.exe failureflag" { sc.exe failureflag $ServiceName 1 | Out-Null }

if ($Firewall) {
    # peers and the TF cluster connect in on ephemeral ports (private networks only)
    $svcHost = Join-Path (& $py -c "import win32service, os; print(os.path.dirname(win32service.__file__))") "pythonservice.exe"
    foreach ($prog in @($py, $svcHost)) {
        New-NetFirewallRule -DisplayName "crowdd ($([IO.Path]::GetFileName($prog)))" -Direction Inbound `
            -Program $prog -Action Allow -Profile Private | Out-Null
    }
}

Start-Service -Name $ServiceName
Write-Host "crowdd service installed and started; files in $Root"
Write-Host "control it with:  crowdd status --root `"$Root`"   (members of group '$GroupName' and administrators)"
Write-Host "donation starts off:  crowdd donate on --root `"$Root`""

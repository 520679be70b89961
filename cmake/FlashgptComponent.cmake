# flashgpt_add_component(NAME SOURCES a.cc ... HEADERS a.h ... [DEPENDS other ...])
#
# One component = one static library, flashgpt_NAME (flashgpt::NAME), built from the
# sources of src/NAME. Its public headers live in include/flashgpt/ like every other's,
# but each component sees only the public headers of itself and of the components it
# DEPENDS on (directly or through them): the listed HEADERS are linked into
# BUILD/include/NAME/flashgpt/, and that folder, not include/, is the component's public
# include directory. Its private headers stay in src/NAME, on no other target's include
# path. So a reach-in (another component's private header) or a back-edge (a component
# later in the data flow) is a compile error, not a review comment.
#
# DEPENDS may name only components earlier in the data flow (FLASHGPT_COMPONENT_ORDER), so a
# back-edge is already a configure error.
set(FLASHGPT_COMPONENT_ORDER common tokenizer data attention model train generate eval cli)

function(flashgpt_add_component name)
  cmake_parse_arguments(ARG "" "" "SOURCES;HEADERS;DEPENDS" ${ARGN})
  list(FIND FLASHGPT_COMPONENT_ORDER ${name} position)
  if(position EQUAL -1)
    message(FATAL_ERROR "component ${name}: not in FLASHGPT_COMPONENT_ORDER (${FLASHGPT_COMPONENT_ORDER})")
  endif()
  foreach(dep IN LISTS ARG_DEPENDS)
    list(FIND FLASHGPT_COMPONENT_ORDER ${dep} dep_position)
    if(dep_position EQUAL -1 OR NOT dep_position LESS position)
      message(FATAL_ERROR "component ${name} may not depend on ${dep}: data flows ${FLASHGPT_COMPONENT_ORDER}")
    endif()
  endforeach()
  set(target flashgpt_${name})
  add_library(${target} STATIC ${ARG_SOURCES})
  add_library(flashgpt::${name} ALIAS ${target})
  set_target_properties(${target} PROPERTIES EXPORT_NAME ${name})

  set(stage ${PROJECT_BINARY_DIR}/include/${name})
  file(REMOVE_RECURSE ${stage})
  file(MAKE_DIRECTORY ${stage}/flashgpt)
  foreach(header IN LISTS ARG_HEADERS)
    set(source ${PROJECT_SOURCE_DIR}/include/flashgpt/${header})
    if(NOT EXISTS ${source})
      message(FATAL_ERROR "component ${name}: no public header include/flashgpt/${header}")
    endif()
    file(CREATE_LINK ${source} ${stage}/flashgpt/${header} SYMBOLIC)
    set_property(GLOBAL APPEND PROPERTY FLASHGPT_OWNED_HEADERS ${header})
  endforeach()
  target_include_directories(${target}
    PUBLIC $<BUILD_INTERFACE:${stage}> $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>
    PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  foreach(dep IN LISTS ARG_DEPENDS)
    target_link_libraries(${target} PUBLIC flashgpt_${dep})
  endforeach()
  set_property(GLOBAL APPEND PROPERTY FLASHGPT_COMPONENTS ${target})
endfunction()
